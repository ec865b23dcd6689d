"""The simulator twin: the real scheduler, KV bookkeeping and cluster policies against a cost model. No torch."""
