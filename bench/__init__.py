"""Speed and memory benchmarks of Backpack GPT-2 against its GPT-2 contextualization network.

Entry point: ``python bench/run.py [--quick] [--device cpu|cuda] [--dtype ...] [--config micro|...] --json OUT.json``.
See ``bench/README.md``.
"""
