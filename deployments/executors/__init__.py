"""Engine backends behind one Executor contract (see `base.Executor`)."""
