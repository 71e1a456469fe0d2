"""Op families: one module per family (launchers, autograd.Function, public functionals)."""
