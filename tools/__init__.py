"""Cross-stage programs, as detectron2 keeps its tools/: the demo (``demo.py``), suites of runs
(``suite.py``), benchmarks (``bench.py``, ``bench_tasks.py``), ``doctor.py``, the detectron2
installer (``install_detectron2.py``), the real samples' layout (``sample_data.py``) and every
generated dataset (``fixtures/``).
"""
