"""Recipes: top-to-bottom programs over the library, as torchtune's recipes are.

``continual`` (train a run, filling its CL matrix as it goes), ``compare`` (every method on
one suite, one or several seeds) and ``quickstart`` (the embedded default job). A recipe is
the only place where training and evaluation meet, and where a process is set up (process
group, stop signals, logging); the library packages below never import one another in a
circle (ARCHITECTURE.md).
"""
