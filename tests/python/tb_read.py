"""Reads a folder of TensorBoard event files with TensorBoard's own reader and prints its scalars as JSON:
{tag: [[step, value], ...]}. usage: tb_read.py DIR"""
import json, sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
