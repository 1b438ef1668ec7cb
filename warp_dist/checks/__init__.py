"""Checks before anything expensive starts: the pre-launch checks of a config and its environment (`preflight`) and
the memory plan of what each rank will hold (`plan`)."""
