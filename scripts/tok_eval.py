"""
How well does the trained tokenizer compress? Bytes per token (higher is better) on a few kinds of
text and on samples of the train/val shards, next to GPT-2's and GPT-4's encodings when tiktoken can
fetch them (it needs network once, then caches them; offline we print a one-line notice and go on).

    python -m scripts.tok_eval [--no_baselines] [--baseline_timeout=20]

Logs a "Tokenizer evaluation" section to the report.
"""

import sys
import argparse
import threading

from nanochat.common import print0
from nanochat.dataset import parquets_iter_batched
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
from nanochat.report import get_report

# Short samples of different kinds, written for this script.
NEWS_TEXT = """
RIVERTON, Ore. (March 3, 2026) - The Harlow Street bridge reopened to traffic on Tuesday morning, 14 months
after a barge struck one of its piers during the winter floods of January 2025. City engineers said the
$38.6 million repair replaced two of the bridge's five spans and added sensors that report vibration
and water levels every 30 seconds.

"We promised the east side it would get its shortest route downtown back before spring, and we kept
that promise," Mayor Denise Okafor told a crowd of about 200 residents gathered at the west ramp. Buses
on routes 12 and 47 return to their old schedule next Monday; the temporary ferry, which carried
more than 410,000 passengers while the bridge was closed, makes its last crossing on Friday.

Not everyone was celebrating. Owners of several shops along Marsh Avenue, which had seen heavier
traffic during the detour, worried that customers would disappear. "Business went up almost 20% last
year," said Tom Reyes, who runs a hardware store near the ferry landing. "I hope people remember us."
""".strip()

CODE_TEXT = '''
import heapq
from collections import defaultdict


def shortest_paths(edges, source):
    """Dijkstra: distance from source to every reachable node. edges: iterable of (u, v, weight)."""
    graph = defaultdict(list)
    for u, v, weight in edges:
        if weight < 0:
            raise ValueError(f"negative weight on edge {u}->{v}: {weight}")
        graph[u].append((v, weight))

    dist = {source: 0}
    frontier = [(0, source)]
    while frontier:
        d, node = heapq.heappop(frontier)
        if d > dist.get(node, float("inf")):
            continue  # stale entry: a shorter path was found after this one was pushed
        for neighbor, weight in graph[node]:
            candidate = d + weight
            if candidate < dist.get(neighbor, float("inf")):
                dist[neighbor] = candidate
                heapq.heappush(frontier, (candidate, neighbor))
    return dist


if __name__ == "__main__":
    roads = [("a", "b", 4), ("a", "c", 1), ("c", "b", 2), ("b", "d", 5), ("c", "d", 8)]
    for node, d in sorted(shortest_paths(roads, "a").items()):
        print(f"{node}: {d:>3}")
'''.strip()

MATH_TEXT = r"""
\section*{The geometric series}
\begin{proposition}
Let $r \in \mathbb{R}$ with $|r| < 1$. Then $\displaystyle\sum_{k=0}^{\infty} r^{k} = \frac{1}{1-r}$.
\end{proposition}
\begin{proof}
Write $S_n = \sum_{k=0}^{n} r^k = 1 + r + r^2 + \cdots + r^n$. Multiplying by $r$ gives
\[
  r S_n = r + r^2 + \cdots + r^{n+1},
\]
so subtracting the two lines leaves $(1 - r) S_n = 1 - r^{n+1}$, that is
\[
  S_n = \frac{1 - r^{n+1}}{1 - r} \qquad (r \neq 1).
\]
Since $|r| < 1$ we have $|r^{n+1}| = |r|^{n+1} \to 0$ as $n \to \infty$, hence
$\lim_{n\to\infty} S_n = \frac{1}{1-r}$. For example $r = \tfrac{1}{2}$ gives
$1 + \tfrac12 + \tfrac14 + \dots = 2$, and $r = -0.9$ gives $\frac{1}{1.9} \approx 0.5263$.
\end{proof}
\begin{remark}
For $|r| \geq 1$ the terms do not tend to $0$, so the series diverges.
\end{remark}
""".strip()

SCIENCE_TEXT = """
Mitochondria generate most of a eukaryotic cell's ATP through oxidative phosphorylation. Electrons
stripped from NADH and FADH₂ pass along complexes I–IV of the inner mitochondrial membrane, and the
energy released pumps protons (H⁺) from the matrix into the intermembrane space. The resulting
electrochemical gradient, roughly 150–200 mV, drives protons back through ATP synthase, whose rotating
c-ring couples each turn to the synthesis of three ATP molecules from ADP and inorganic phosphate.
Oxygen is the terminal electron acceptor: at complex IV it is reduced to water (O₂ + 4e⁻ + 4H⁺ → 2H₂O).
Uncoupling proteins such as UCP1 in brown adipose tissue let protons leak back without making ATP,
releasing the gradient's energy as heat, a mechanism used by hibernating mammals and newborns.
""".strip()

SPANISH_TEXT = """
La biblioteca municipal de Villanueva abrirá sus puertas también los domingos a partir del próximo mes.
Según la concejala de Cultura, la decisión responde a una petición firmada por más de tres mil vecinos,
muchos de ellos estudiantes que no encuentran un lugar tranquilo para preparar los exámenes. «Queremos
que la biblioteca sea el salón de estar de todo el pueblo», explicó. El horario ampliado costará unos
45.000 euros al año, que se cubrirán con una subvención regional y con la reorganización de turnos.
""".strip()

JAPANESE_TEXT = """
今年の春、山あいの小さな町で古い木造校舎が図書館として生まれ変わった。閉校から十年、
地元の大工と卒業生たちが二年かけて床や窓を修理し、教室には約一万二千冊の本が並んでいる。
週末には子ども向けの読み聞かせ会が開かれ、遠くの町から訪れる家族も少なくない。
館長は「学校の記憶を残しながら、新しい集いの場にしたかった」と話している。
""".strip()

SAMPLE_TEXTS = [
    ("news", NEWS_TEXT),
    ("code", CODE_TEXT),
    ("math", MATH_TEXT),
    ("science", SCIENCE_TEXT),
    ("spanish", SPANISH_TEXT),
    ("japanese", JAPANESE_TEXT),
]

# name in the table -> tiktoken encoding
BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Compression (bytes per token) of the trained tokenizer.")
    parser.add_argument("--no_baselines", action="store_true", help="skip the GPT-2/GPT-4 comparison")
    parser.add_argument("--baseline_timeout", type=float, default=20.0,
                        help="seconds to wait for tiktoken to load each baseline encoding (default: 20)")
    return parser.parse_args(argv)


def load_baseline(tiktoken_name, timeout):
    """The encoding, or the reason it could not be had within timeout seconds (tiktoken has no timeout itself)."""
    result = {}

    def load():
        try:
            result["tokenizer"] = RustBPETokenizer.from_pretrained(tiktoken_name)
        except Exception as e:  # offline: a requests ConnectionError; anything else is just as fatal here
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

    thread = threading.Thread(target=load, daemon=True)  # daemon: a hung download must not keep us alive
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, f"no answer within {timeout:.0f}s"
    return result.get("tokenizer"), result.get("error")


def shard_sample(split):
    """All documents of the split's first row group, joined by newlines; None (with a notice) if missing."""
    try:
        docs = next(parquets_iter_batched(split=split), [])
    except FileNotFoundError as e:
        print0(f"Skipping the {split} sample: {e}")
        return None
    return "\n".join(docs)


def main(argv=None):
    args = parse_args(argv)
    try:
        tokenizers = [("Ours", get_tokenizer())]
    except FileNotFoundError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if not args.no_baselines:
        for label, tiktoken_name in BASELINES:
            tokenizer, error = load_baseline(tiktoken_name, args.baseline_timeout)
            if tokenizer is None:
                print0(f"GPT-2/GPT-4 comparison skipped: tiktoken could not load {tiktoken_name} (offline?) ({error})")
                break
            tokenizers.append((label, tokenizer))

    texts = list(SAMPLE_TEXTS)
    for split in ("train", "val"):
        sample = shard_sample(split)
        if sample:
            texts.append((f"fwe-{split}", sample))

    # counts[label][text name] = number of tokens
    counts = {label: {} for label, _ in tokenizers}
    for label, tokenizer in tokenizers:
        for name, text in texts:
            ids = tokenizer.encode(text)
            if tokenizer.decode(ids) != text:
                raise RuntimeError(f"{label} tokenizer does not round-trip the {name} text")
            counts[label][name] = len(ids)

    # One row per text: bytes, then tokens and bytes/token per tokenizer, then how many fewer tokens
    # ours needs than each baseline (positive = ours compresses better).
    header = ["text", "bytes"]
    for label, _ in tokenizers:
        header += [f"{label} tokens", f"{label} B/tok"]
    header += [f"vs {label}" for label, _ in tokenizers[1:]]
    rows = []
    for name, text in texts:
        nbytes = len(text.encode("utf-8"))
        row = [name, f"{nbytes:,}"]
        for label, _ in tokenizers:
            row += [f"{counts[label][name]:,}", f"{nbytes / counts[label][name]:.2f}"]
        for label, _ in tokenizers[1:]:
            row.append(f"{100 * (counts[label][name] - counts['Ours'][name]) / counts[label][name]:+.1f}%")
        rows.append(row)

    vocab_line = ", ".join(f"{label} {tokenizer.get_vocab_size():,}" for label, tokenizer in tokenizers)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print0(f"\nVocab sizes: {vocab_line}")
    print0("Bytes per token (higher = better compression); 'vs X' = fewer tokens than X (positive = ours better)\n")
    print0("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print0("  ".join("-" * w for w in widths))
    for row in rows:
        print0("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))

    markdown = [f"Vocab sizes: {vocab_line}", "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" for _ in header) + "|"]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    if len(tokenizers) == 1 and not args.no_baselines:
        markdown += ["", "GPT-2/GPT-4 comparison skipped: their encodings could not be loaded (offline)."]
    get_report().log(section="Tokenizer evaluation", data=["\n".join(markdown)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
