"""What a person at a terminal sees: the live progress, the prompt, the summary.

Only commands import this package (it is the edge, as the command line is); rich is imported
only when a live display is actually shown, so ``--help`` stays fast.
"""
