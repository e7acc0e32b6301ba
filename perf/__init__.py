"""The benchmarks of triton_instnorm: a library and the commands on top of it (perf/README.md).

Commands, ``python -m perf.<name>`` (no library module imports them):
    report     bandwidth per shape class, dtype, direction and provider (GPU)
    training   training steps of instance-norm networks (GPU)
    traffic    the table of bytes and programs per launch, counted on the CPU
    overhead   host cost per call next to torch's

Library, each module importing only modules listed before it:
    model, shapes, schema, files   byte model, shape classes, the result files' columns and
                                   names, paths and CSV files (all torch-free)
    machine     the interpreter switch, the device, the versions
    timing, networks, providers, counting   timers, the benchmarked networks, who computes the
                                   timed norm, bytes and launches counted through the interpreter
    summary, plots   markdown and PNGs from rows
    cli         what the commands share: options, output directories, progress, redrawing
    deadline    a pytest plugin (first_light.sh)

tests/test_perf_imports.py keeps it so: no import cycle, no library module importing a command.
"""
