"""Cross-stage programs (benchmarks over transfer tasks, ...), as detectron2 keeps its tools/."""
