"""``tokenyard bench``: a serving benchmark client for OpenAI-compatible servers.

workload.py   what to send (lengths, tenants, priorities, conversations)
arrivals.py   when to send it (Poisson, Gamma with a burstiness knob, all at once)
traces.py     Azure LLM trace CSVs -> requests with their arrival times
prompts.py    prompt text of exactly N tokens for the served model's tokenizer
client.py     async HTTP + SSE: one timed record per request
records.py    RequestRecord: what was asked for and what happened to one request
metrics.py    pure functions over those records (latency percentiles, throughput, goodput, fairness)
report.py     table, JSON and plot; progress bar
runner.py     ``bench serve``: the pieces above in order
capacity.py   ``bench capacity``: binary search for the largest rate meeting a TBT SLO
cli_args.py   the argparse side, registered by tokenyard/cli.py
"""
