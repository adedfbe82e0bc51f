"""Chat tasks: conversations to train on and problems to evaluate, one file per dataset (see common.py)."""
