"""Benchmarks of the swamp_kernels ops against the baselines a user would use instead.

``python -m benchmarks.run`` measures every case on a CUDA GPU and writes
``benchmarks/results/<gpu>.json`` (+ ``.md``); ``python -m benchmarks.render`` puts the
tables into README.md. Method and floor definition: benchmarks/README.md, DESIGN.md section 5.
"""
