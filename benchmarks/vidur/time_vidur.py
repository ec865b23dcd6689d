"""Same as `python -m vidur.main`, but times the phases separately.
Prints one JSON line: setup_s (config + predictor train/cache-load + request generation),
loop_s (event loop only), output_s (metrics/CSV writing), num_requests, num_replicas."""
import json
import time

t0 = time.perf_counter()
from vidur.config import SimulationConfig  # noqa: E402 - timed: the import is measured
from vidur.simulator import Simulator  # noqa: E402
from vidur.utils.random import set_seeds  # noqa: E402

t_import = time.perf_counter()
config = SimulationConfig.create_from_cli_args()
set_seeds(config.seed)
sim = Simulator(config)
t_setup = time.perf_counter()

timing = {}
# count batch-stage executions (one predictor call each) -- a cheap counter, negligible overhead
predictor = next(iter(sim.scheduler._replica_schedulers.values()))._execution_time_predictor
_orig_predict = predictor.get_execution_time
n_batches = [0]


def counted_predict(*a, **k):
    n_batches[0] += 1
    return _orig_predict(*a, **k)


predictor.get_execution_time = counted_predict
orig_write = sim._write_output


def timed_write():
    timing["loop_end"] = time.perf_counter()
    orig_write()


sim._write_output = timed_write
sim.run()
t_end = time.perf_counter()

n_req = sum(1 for _ in open(config.request_generator_config.trace_file)) - 1 \
    if hasattr(config.request_generator_config, "trace_file") else None
loop_s = timing["loop_end"] - t_setup
print("VIDUR_TIMING " + json.dumps({
    "import_s": round(t_import - t0, 3),
    "setup_s": round(t_setup - t_import, 3),
    "loop_s": round(loop_s, 3),
    "output_s": round(t_end - timing["loop_end"], 3),
    "num_requests": n_req,
    "num_replicas": config.cluster_config.num_replicas,
    "simulated_time_s": round(sim._time, 3),
    "num_batches": n_batches[0],
    "batches_per_s": round(n_batches[0] / loop_s, 1),
    "requests_per_s": round(n_req / loop_s, 2) if n_req else None,
}), flush=True)
