"""What every command shares and no algorithm: the run (``session``), the loop's pieces
(``loop``: optimizer and schedule, engine preparation, accumulation, the clipped step, cadence,
checkpoints, resume, stop signals), the run directory (``outputs``), several processes
(``distributed``) and where the numbers go (``tracking``)."""

# the command line being run, set by the CLI (final/'s model card repeats it); light to import
invocation: list[str] | None = None
