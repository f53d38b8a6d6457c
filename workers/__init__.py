"""The worker side of farm: processes that hold llama.cpp models and serve their queues.

Needs llama-cpp-python (`pip install 'farm[worker]'`); `farm` itself never imports this.
"""
