"""
The Engine's decode step, fast: the model's own forward (nanochat/gpt.py) for one new token per row, run on
a copy of the model prepared for it, in one of three modes.

The copy (prepare_for_decoding) shares the embedding and the rotary tables with the model and holds its
matrices cast to the decode dtype once, each layer's q/k/v matrices stacked into one (one matmul instead of
three), and on CPU in bf16 (in fp32 too where MKL runs its generic code) prepacked into oneDNN's blocked layout:
for a matmul of a few rows the fixed cost of each call, not the arithmetic, sets the pace. The Decoder rebuilds
it when the model's parameters change.

Modes (MODES, chosen per Engine):
- "eager": plain PyTorch ops. On CPU with several threads, the first steps of each batch size time one
  thread against torch's number and keep the faster (a matmul of a few rows can lose by waking the others).
- "compile": torch.compile of the step. On CPU the weights are frozen into the generated code and the cache position
  is symbolic, so one compiled step per batch size serves every position and prompt (see cpu_compile_settings), and
  a top-k draw happens in that code too (run_step_and_pick: the sampler's top-k, softmax and pick, given the random
  numbers drawn outside it), as does a greedy one (run_step_and_argmax); elsewhere the fixed-shape form is compiled
  (the position held in a tensor on the device, attention over the cache's whole capacity with the unwritten
  positions masked out). Once compiled, a CPU step calls the compiled version whose guards pass as a plain function
  (DirectCall), without dynamo's own per-call work. With live weights (a model trained between generations, as in
  RL) the CPU step reads the weights at each call instead, its matmuls through prepacked_linear, so an optimizer
  step does not compile it again.
- "cuda_graph": the fixed-shape form captured once as a CUDA graph and replayed: one launch per token.
A compile or capture that fails says so once, and the Decoder decodes eagerly from then on.
"""

import copy
import functools
import time
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import hardware
from nanochat.common import print0
from nanochat.gpt import soft_cap
from nanochat.sampling import greedy, pick_top_k

MODES = ("eager", "compile", "cuda_graph")


def check_mode(mode):
    """A decode mode as given by a user (None or "" = the device's default), or a ValueError saying the choices."""
    if mode not in (None, "", *MODES):
        raise ValueError(f"decode mode must be one of {'|'.join(MODES)} (or empty: cuda_graph on CUDA, eager "
                         f"elsewhere), got {mode!r}")
    return mode or None


def session_mode(device):
    """
    The decode mode for a long-lived session (a chat in the terminal, the web server): on CPU compiled once at
    load, which then decodes each token several times faster than eager (dev/bench_engine.py); elsewhere the
    device's default. One-shot generation (a single prompt, a few samples) keeps the default: no compile to pay.
    """
    return "compile" if torch.device(device).type == "cpu" else None


# A job of this many completions or more (per process) compiles its decode step on CPU. chat_eval's GSM8K on
# runcpu.sh's depth-4 SFT model, fp32, 2-core AMD EPYC: eager 0.29 s a problem, compiled 0.066 s after a compile of
# ~12 s with torch's cache warm (200 problems: 58.2 s eager, 25.3 s compiled in all); 256 problems with the compile
# cache empty: 59.8 s compiled, 80.5 s eager. Measured at depth 4 only.
COMPILE_MIN_COMPLETIONS = 256


def job_mode(device, completions):
    """
    The decode mode for a job of many separate generations (chat_eval's generative tasks: `completions` to draw in
    this process): on CPU compiled where there are enough of them to repay the compile (COMPILE_MIN_COMPLETIONS),
    else, and elsewhere, the device's default.
    """
    return "compile" if torch.device(device).type == "cpu" and completions >= COMPILE_MIN_COMPLETIONS else None


def can_pack_weights(device, dtype):
    """
    oneDNN's prepacked matmul: on CPU, in bf16 (plain bf16 matmuls of one row are slow there), and in fp32 where
    MKL, which serves plain fp32 matmuls, runs its generic code (hardware.mkl_runs_generic_code). Packed fp32
    matrices are a copy: fp32 decoding there (eager, or with live weights) holds the model's matrices twice.
    """
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:  # oneDNN packs bf16 only with AVX512 (BW, VL, DQ) or AVX-NE-CONVERT, else it raises
        supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        packable_dtype = supported is not None and supported()
    else:
        packable_dtype = dtype == torch.float32 and hardware.mkl_runs_generic_code()
    return packable_dtype and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def onednn_packed(weight):
    """
    weight reordered into oneDNN's blocked layout, laid out for a number of rows: in fp32 the layout for 1 row made
    matmuls of 8 rows slow, and the one for 8 is as fast for 1 (2-core AMD EPYC, 8 x 256 times 256 x 8192: 438 vs
    178 us; 1 row: 83 vs 80 us); in bf16 it made no difference, and the bf16 path keeps 1.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8 if weight.dtype == torch.float32 else 1)


class PreparedLinear(nn.Module):
    """
    x @ weight.T with the weight cast to dtype once. pack="eager": the weight reordered once into oneDNN's blocked
    layout (the matmul then goes straight to oneDNN: the same result as F.linear on the same bf16 weights).
    pack="live": the weight kept plain, with its packed copy attached for prepacked_linear (see there). The
    weight is a buffer, so that a compiled step can freeze it into its code or take it as an input.
    """

    def __init__(self, weight, dtype, pack=None):
        super().__init__()
        if pack not in (None, "eager", "live"):
            raise ValueError(f"pack must be None, 'eager' or 'live', got {pack!r}")
        self.dtype, self.pack = dtype, pack
        weight = weight.detach().to(dtype)  # the model's own tensor when dtype is its dtype: no copy
        if pack == "eager":
            weight = onednn_packed(weight)
        self.register_buffer("weight", weight, persistent=False)
        if pack == "live":
            attach_packed(self.weight)

    def forward(self, x):
        if self.pack == "eager":  # (B, 1, C) as it is: flattening to 2D first made the whole decode step slower
            return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, None, "none", [None], "")
        if self.pack == "live":
            return prepacked_linear(x.to(self.dtype), self.weight)
        return F.linear(x.to(self.dtype), self.weight)


def attach_packed(weight):
    """Attach weight's oneDNN-packed copy to it, for prepacked_linear (again after every change to weight)."""
    weight.onednn_packed = onednn_packed(weight)


@torch.library.custom_op("nanochat::prepacked_linear", mutates_args=())
def prepacked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    x @ weight.T by oneDNN's prepacked matmul, with the packed copy attach_packed gave the weight (packed here if
    it has none: the same result, slower). torch.compile cannot see inside it, so a compiled step takes the plain
    weight as an input (the packed one cannot be) and reads it at each call, while the matmul stays as fast as
    the eager step's.
    """
    packed = getattr(weight, "onednn_packed", None)
    if packed is None:
        packed = onednn_packed(weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


@prepacked_linear.register_fake
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.size(0)))


def prepare_for_decoding(model, dtype, eager, live=False):
    """
    A copy of model (same class, same forward) that shares its tensors but multiplies by PreparedLinear, packed
    where that is faster. eager=True: for running step by step in Python, without nn.Module's dispatch.
    live=True (compiled, weights that change): matrices refreshed in place by refresh_weights.
    """
    packable = can_pack_weights(model.get_device(), dtype)
    pack = "eager" if eager and packable else "live" if live and packable else None
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    decoder = copy.deepcopy(model, memo=shared)  # the modules are copied, the tensors shared
    for block in decoder.transformer.h:
        attn, mlp = block.attn, block.mlp
        attn.c_qkv = prepared(dtype, pack, attn.c_q.weight, attn.c_k.weight, attn.c_v.weight)
        del attn.c_q, attn.c_k, attn.c_v
        attn.c_proj = prepared(dtype, pack, attn.c_proj.weight)
        mlp.c_fc = prepared(dtype, pack, mlp.c_fc.weight)
        mlp.c_proj = prepared(dtype, pack, mlp.c_proj.weight)
    decoder.lm_head = prepared(dtype, pack, model.lm_head.weight)
    decoder.eval()
    return without_module_dispatch(decoder) if eager else decoder


def prepared(dtype, pack, *weights):
    """PreparedLinear of the weights stacked (q, k and v: one matmul instead of three), remembering them."""
    linear = PreparedLinear(torch.cat(weights) if len(weights) > 1 else weights[0], dtype, pack)
    linear.sources = weights  # the model's parameters, for refresh_weights
    return linear


def refresh_weights(decoder):
    """Copy the model's current weights into a prepared copy, in place: a compiled step that takes them as inputs
    (not frozen) computes with the new values without compiling again."""
    for linear in decoder.modules():
        if isinstance(linear, PreparedLinear):
            linear.weight.copy_(torch.cat(linear.sources) if len(linear.sources) > 1 else linear.sources[0])
            if linear.pack == "live":
                attach_packed(linear.weight)


def without_module_dispatch(decoder):
    """
    decoder with its submodules, parameters and buffers as plain attributes, and each module's call going
    straight to its forward. nn.Module reaches them through __getattr__ and calls through its hook dispatch,
    both in Python, ~90 lookups and ~30 calls per decode step: a large share of a small model's step
    (dev/bench_engine.py). A prepared copy has no hooks and is never changed, so neither is needed.
    """
    for module in decoder.modules():
        vars(module).update({**module._modules, **module._parameters, **module._buffers})
        module.__class__ = _called_directly(type(module))
    return decoder


@functools.lru_cache(maxsize=None)
def _called_directly(cls):
    return type(cls.__name__, (cls,), {"__call__": cls.forward, "__module__": cls.__module__})


def run_step(decoder, cache, ids):
    """ids (B, 1) -> logits (B, V) of the next position as the lm_head gives them, in its dtype and before the
    soft-cap (the sampler upcasts and caps those it keeps: sampling.sample_next_token); the cache advances by one."""
    return decoder(ids, kv_cache=cache, capped=False)[:, -1]


def run_step_and_pick(decoder, cache, ids, noise, temperature):
    """
    run_step, then the next tokens (B, 1) drawn among the noise.size(1) largest logits at temperature given noise
    (what sampling.Sampler.step_inputs gives). Compiled, the sampler's ops run in the step's generated code instead
    of one by one after it: depth 4, 2-core AMD EPYC, top-k 50, 1.07-1.09x the tokens/s at batch 1, 1.04x at batch 8.
    """
    return pick_top_k(run_step(decoder, cache, ids), noise, temperature, cap=soft_cap)


def run_step_and_argmax(decoder, cache, ids):
    """
    run_step, then the greedy next tokens (B, 1). Compiled, the argmax runs in the step's generated code instead of
    as a cast and an argmax after it: depth 4, 2-core AMD EPYC, 1.05-1.06x the tokens/s at batch 1, 1.04-1.10x at
    batch 8 (dev/bench_engine.py --workloads=greedy --compare_dir, two runs).
    """
    return greedy(run_step(decoder, cache, ids))


def _guards_worth_checking(guards):
    """
    Of dynamo's guards on a compiled step, keep all but those on the prepared copy's module attributes (types,
    empty hook dicts...), which were half of each call's guard time: a prepared copy is never changed after it is
    made. The guards on its tensors stay, so a new copy (new weights) still compiles again.
    """
    return [not g.orig_guard.source.is_unspecialized_nn_module() or g.guard_type in ("TENSOR_MATCH", "ID_MATCH")
            for g in guards]


@functools.lru_cache(maxsize=None)
def compiled_step(step=run_step):
    """torch.compile(step) (run_step, run_step_and_pick or run_step_and_argmax), made on first use (one per process
    and step function; it compiles again per weights and batch size)."""
    return torch.compile(step, fullgraph=True, options={"guard_filter_fn": _guards_worth_checking})


def compiled_versions(step):
    """
    What torch.compile made of step so far, newest first: dynamo's cache entries, each with its guards
    (guard_manager.check(the step's arguments by name) says whether it serves them) and step's bytecode as dynamo
    rewrote it to run the compiled graph (code). Empty where this torch does not expose them.
    """
    cache_entries = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if cache_entries is None:
        return []
    return [entry for entry in cache_entries(step.__code__)
            if hasattr(entry, "guard_manager") and not entry.code.co_freevars]


class DirectCall:
    """
    One compiled version of a step (run_step, run_step_and_pick or run_step_and_argmax) as a plain function: the
    step's bytecode as dynamo rewrote it, with the step's globals, where dynamo keeps the compiled graph. Before
    each call the Decoder asks serves(args): the version's guards, all of them, checked as dynamo checks them.
    Skipped is only dynamo's own work around that check (frame evaluation, the lookup and the compiled region's
    bookkeeping): depth 4, 2-core AMD EPYC, 1.08-1.10x the tokens/s at batch 1, 1.03-1.07x at batch 8
    (dev/bench_engine.py --compare_dir, two runs).
    """

    def __init__(self, step, version):
        self.names = step.__code__.co_varnames[:step.__code__.co_argcount]
        self.guards = version.guard_manager
        self.function = types.FunctionType(version.code, step.__globals__, step.__name__, step.__defaults__)

    def serves(self, args):
        return self.guards.check(dict(zip(self.names, args)))

    @classmethod
    def find(cls, step, args):
        """The DirectCall of the compiled version of step that serves args, or None (also where this torch's
        dynamo differs from what this expects: its own call then does the same work)."""
        for version in compiled_versions(step):
            try:
                call = cls(step, version)
                if call.serves(args):
                    return call
            except (AttributeError, TypeError):
                return None
        return None


# How the step is compiled on CPU (settings in force while its first call compiles it):
# - freezing: the prepared weights become constants of the code, prepacked for its matmuls;
# - the cache position (KVCache.pos, read as cache.pos) and the cache's capacity symbolic from the start, so one
#   compiled step per batch size serves every position, prompt and generation length, attending over the filled
#   part of the cache only (with the capacity fixed, a conversation outgrowing the first cache would compile the
#   step again, without these settings);
# - no checks of the shapes, strides and alignment of each matmul's result in the generated code: its Python
#   wrapper is a large share of a small model's step, and the calls are fixed when it compiles (batch 8: ~1.04x);
# - max_autotune with inductor's C++ GEMM templates as candidates: the matmuls of a few rows become generated code
#   where it times faster than oneDNN's calls. On a 2-core AMD EPYC, the step with the templates allowed against
#   without: bf16 batch 1 1.5x at depth 8, 1.6x at depth 12, 1.13x at depth 16 (400 MB of weights, far past the 32 MB L3),
#   batch 8 the same; fp32 (CPUs without bf16) 2.9x at depth 4 batch 1, 2.1x batch 8, 2.6x at depth 12 batch 1.
#   (They used to be allowed only when the weights fit in half the largest CPU cache, which held back all of that.)
CPU_COMPILE_DYNAMIC = "L['cache'].pos"


def cpu_compile_settings(live=False):
    """Inductor settings for compiling the decode step on CPU (see above). Live weights are not frozen, and not
    autotuned: their matmuls are prepacked_linear's, and a choice by timing could differ between two runs (a
    resumed RL run must draw the same rollouts)."""
    unchecked = dict(size_asserts=False, alignment_asserts=False)
    if live:
        return dict(freezing=False, **unchecked)
    return dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN", **unchecked,
                autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # no tables


class Decoder:
    """
    How an Engine runs its decode steps: the mode (one of MODES; None = cuda_graph on CUDA, eager elsewhere),
    the model prepared for it, and what the mode has learned on the way: the steps compiled, the thread
    count chosen per batch size, and whether compiling failed. timed_threads=False keeps eager CPU steps on
    torch's thread count instead of the faster of two timed ones: the thread count changes the logits' last bits,
    so a choice by timing could differ between two runs (training that samples from the model, e.g. RL rollouts,
    must not depend on one to resume exactly). live_weights=True: the model is trained between generations; a
    compiled CPU step then reads the weights at each call (refreshed in place) instead of compiling again for
    each new set.
    """

    def __init__(self, mode=None, timed_threads=True, live_weights=False):
        self.mode = check_mode(mode)
        self.timed_threads = timed_threads
        self.live_weights = live_weights
        self.prepared, self.prepared_for, self.prepared_versions = None, None, None
        self.compiled_steps = set()  # CPU: (step function, batch size) compiled for the current prepared copy
        self.direct_calls = {}  # CPU: (step function, batch size) -> the DirectCall that served it last
        self.thread_trials = {}  # CPU eager, per batch size: {threads: [seconds per step]}
        self.failed = False  # compiling or capturing failed once: eager from then on

    def prepare(self, model, dtype, eager):
        """The prepared copy of model, made again only when a parameter was changed (trained) or moved since (live
        weights compiled: changed parameters are copied into it instead)."""
        params = list(model.parameters())
        prepared_for = (dtype, eager, [p.data_ptr() for p in params])
        versions = [p._version for p in params]
        live = self.live_weights and not eager
        if prepared_for != self.prepared_for or (versions != self.prepared_versions and not live):
            self.prepared = prepare_for_decoding(model, dtype, eager, live=live)  # new weights: compile again
            self.prepared_for, self.compiled_steps, self.direct_calls = prepared_for, set(), {}
        elif versions != self.prepared_versions:  # live weights: the changed ones copied into the prepared copy
            refresh_weights(self.prepared)
        self.prepared_versions = versions
        return self.prepared

    def _mode_on(self, device):
        """The mode this Decoder runs on device, and whether its steps run eagerly (the mode's, or after a failure)."""
        mode = self.mode or ("cuda_graph" if device.type == "cuda" else "eager")
        return mode, mode == "eager" or self.failed

    def prompt_model(self, model, device, dtype):
        """
        What to run a prompt through before decoding it (the prefill): the copy prepared for this Decoder's steps,
        whose weights were cast, stacked and (eager on CPU) packed once, where the model under autocast casts them
        at every call (depth 4, 2-core AMD EPYC, bf16: a 16-token prompt 2.7x faster, 500 tokens 1.2x).
        """
        return self.prepare(model, dtype, self._mode_on(torch.device(device))[1])

    def start(self, model, cache, dtype, sampler):
        """
        A step function for one generation on this cache: ids (B, 1) -> the next ids (B, 1), drawn by sampler (a
        sampling.Sampler) from the logits run_step gives. A compiled CPU step draws top-k in its own code
        (run_step_and_pick, one compiled step for every k and temperature), greedy ones in another
        (run_step_and_argmax); whole-vocabulary draws compile run_step and sample after it.
        """
        device = cache.k[0].device
        mode, eager = self._mode_on(device)
        if mode == "cuda_graph" and device.type != "cuda":
            raise ValueError(f"cuda_graph decoding needs the model on a CUDA device, not {device}")
        decoder = self.prepare(model, dtype, eager)
        if eager:
            if device.type == "cpu" and torch.get_num_threads() > 1 and self.timed_threads:
                return lambda ids: sampler(self._on_fastest_threads(decoder, cache, ids))
            return lambda ids: sampler(run_step(decoder, cache, ids))
        if mode == "compile" and device.type == "cpu":
            if sampler.draws_top_k:
                vocab_size = model.lm_head.weight.size(0)
                return lambda ids: self._compiled_on_cpu(run_step_and_pick, decoder, cache, ids,
                                                         *sampler.step_inputs(ids.size(0), vocab_size))
            if sampler.temperature == 0:
                return lambda ids: self._compiled_on_cpu(run_step_and_argmax, decoder, cache, ids)
            return lambda ids: sampler(self._compiled_on_cpu(run_step, decoder, cache, ids))
        cache.hold_position_on_device()  # the fixed-shape form: the compiled step or graph serves every position
        if mode == "compile":
            return lambda ids: sampler(self._or_eager(functools.partial(compiled_step(), decoder, cache, ids), cache,
                                                      functools.partial(run_step, decoder, cache, ids)))
        captured = CapturedStep(self, decoder, cache)
        return lambda ids: sampler(captured(ids))

    def _on_fastest_threads(self, decoder, cache, ids):
        """
        The eager step on one thread or torch's number, whichever was faster: the first 6 steps of a batch size
        alternate between the two, then the faster is kept.
        """
        threads = torch.get_num_threads()
        trials = self.thread_trials.setdefault(ids.size(0), {1: [], threads: []})
        decided = all(len(times) >= 3 for times in trials.values())
        use = min(trials, key=lambda n: min(trials[n])) if decided else min(trials, key=lambda n: len(trials[n]))
        if decided and use == threads:
            return run_step(decoder, cache, ids)  # nothing to switch
        torch.set_num_threads(use)
        try:
            t0 = time.perf_counter()
            logits = run_step(decoder, cache, ids)
            if not decided:
                trials[use].append(time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
        return logits

    def _compiled_on_cpu(self, step, decoder, cache, ids, *pick_inputs):
        """step (run_step, run_step_and_argmax, or run_step_and_pick with its noise and temperature) compiled, at its
        first call per batch size with the settings of cpu_compile_settings."""
        args = (decoder, cache, ids, *pick_inputs)
        eager = functools.partial(step, *args)
        if self.failed or (step, ids.size(0)) in self.compiled_steps:
            return self._or_eager(functools.partial(self._compiled_call, step, args), cache, eager)
        import torch._inductor.config  # noqa: F401 (loaded by the first compile; patched before it)
        print0(f"Engine: compiling the decode step for batch size {ids.size(0)} (once per process, batch size"
               f"{'' if self.live_weights else ' and weights'}; minutes the first time on a machine, far less once "
               f"torch's compile cache holds its kernels)")

        def compile_and_run():
            for keys_or_values in (*cache.k, *cache.v):  # (B, H_kv, capacity, D)
                torch._dynamo.mark_dynamic(keys_or_values, 2)
            if pick_inputs:  # the noise (B, k): one compiled step for every top_k but 1, which torch specialises
                torch._dynamo.mark_dynamic(pick_inputs[0], 1)  # (unbacked, for 1 too, was ~7% slower at batch 1)
            with (torch._inductor.config.patch(cpu_compile_settings(self.live_weights)),
                  torch.compiler.config.patch(dynamic_sources=CPU_COMPILE_DYNAMIC)):
                return compiled_step(step)(*args)

        out = self._or_eager(compile_and_run, cache, eager)
        self.compiled_steps.add((step, ids.size(0)))
        return out

    def _compiled_call(self, step, args):
        """step compiled, run on args: as a DirectCall where one serves them, else through dynamo (which compiles
        again if no version does)."""
        key = (step, args[2].size(0))  # args[2]: the ids, (B, 1)
        call = self.direct_calls.get(key)
        if call is None or not call.serves(args):
            call = self.direct_calls[key] = DirectCall.find(step, args)
        if call is None:
            return compiled_step(step)(*args)
        return call.function(*args)

    def _or_eager(self, compiled, cache, eager):
        """compiled(), or after a compiler failure eager(), the same step uncompiled (said once, then always eager)."""
        if not self.failed:
            pos = cache.pos.clone() if isinstance(cache.pos, torch.Tensor) else cache.pos
            try:
                return compiled()
            except Exception as e:  # a compiler or capture failure (a real error shows again below, eagerly)
                print0(f"Engine: {self.mode} decoding failed ({type(e).__name__}: {str(e)[:300]}); decoding eagerly")
                self.failed = True
                if isinstance(pos, torch.Tensor):
                    cache.pos.copy_(pos)
                else:
                    cache.pos = pos
        return eager()


class CapturedStep:
    """The fixed-shape step captured as a CUDA graph at its first call, then replayed (one launch per token)."""

    def __init__(self, owner, decoder, cache):
        self.owner, self.decoder, self.cache = owner, decoder, cache
        self.graph = None

    def __call__(self, ids):
        if self.graph is not None:
            self.static_ids.copy_(ids)
            self.graph.replay()
            return self.static_logits  # overwritten by the next replay: sample from it first
        return self.owner._or_eager(functools.partial(self._capture, ids), self.cache,
                                    functools.partial(run_step, self.decoder, self.cache, ids))

    def _capture(self, ids):
        # Warm up on a side stream (lazy initialisations must not happen during capture); the warm-up is the
        # real step, and the position goes back before the capture so that the first replay redoes it.
        cache, start = self.cache, self.cache.pos.clone()
        self.static_ids = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_step(self.decoder, cache, self.static_ids)
        torch.cuda.current_stream().wait_stream(side)
        cache.pos.copy_(start)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_logits = run_step(self.decoder, cache, self.static_ids)
        graph.replay()
        self.graph = graph
        return self.static_logits


# -----------------------------------------------------------------------------
# Which dtype to decode in: bf16 where the Engine's own matmuls of one row measured clearly faster

@functools.lru_cache(maxsize=None)
def _bf16_decode_speedup(device):
    return hardware.rank_zeros(_measured_bf16_decode_speedup(device), device)


def _measured_bf16_decode_speedup(device):
    if device.type == "cuda":
        return float("inf") if torch.cuda.is_bf16_supported() else 0.0
    if device.type != "cpu" or not hardware.cpu_has_native_bf16() or not can_pack_weights(device, torch.bfloat16):
        return 0.0
    # One row times a stack of matrices larger than a core's caches, as a decode step of a small model reads them
    generator = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(1024, 1024, generator=generator, device=device) for _ in range(8)]
    x = torch.randn(1, 1024, generator=generator, device=device)
    timings = {}
    fp32_pack = "eager" if can_pack_weights(device, torch.float32) else None  # as the fp32 decode copy multiplies
    for dtype, pack in ((torch.float32, fp32_pack), (torch.bfloat16, "eager")):
        matrices = [PreparedLinear(w, dtype, pack) for w in weights]
        best = float("inf")
        for _ in range(10):  # best of 10: robust to other processes on the machine
            t0 = time.perf_counter()
            for matrix in matrices:
                matrix(x)
            best = min(best, time.perf_counter() - t0)
        timings[dtype] = best
    return timings[torch.float32] / timings[torch.bfloat16]


def bf16_decode_speedup(device):
    """How much faster the Engine's bf16 matmuls of one row are than fp32 ones (inf on CUDA with bf16, 0 where
    bf16 is not native). ~0.05 s on CPU, once per process."""
    return _bf16_decode_speedup(hardware.device_key(device))


@functools.lru_cache(maxsize=None)
def _cpu_bf16_is_native(device):
    return bool(hardware.rank_zeros(float(hardware.cpu_has_native_bf16()), device))  # as rank 0's CPU has it


def choose_decode_dtype(device, mode=None):
    """
    The dtype the Engine should decode in on this device in decode mode `mode`. Compiled on a CPU with native bf16:
    bf16, whose compiled step beat the fp32 one on both kinds measured (dev/bench_engine.py, depth 4, 2 cores: Intel
    AMX 1.2x at batch 1 and 1.7x at batch 8, though its eager one-row matmuls are no faster in bf16; AMD AVX512-BF16
    likewise). Otherwise bf16 where the Engine's eager matmuls of one row measured clearly faster; also for RL's
    compiled rollouts, whose live fp32 weights are cast to the decode dtype at every step.
    """
    device = torch.device(device)
    if device.type == "cpu" and mode == "compile":
        return torch.bfloat16 if _cpu_bf16_is_native(hardware.device_key(device)) else torch.float32
    return torch.bfloat16 if bf16_decode_speedup(device) >= hardware.MIN_BF16_SPEEDUP else torch.float32
