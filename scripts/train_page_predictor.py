"""Train and measure the offload tier's learned discard predictor (Quest eviction="learned").

  python scripts/train_page_predictor.py --json_out=/tmp/page_predictor.json
  python scripts/train_page_predictor.py --write    # also rewrite the shipped weights

Records real SmolLM2-135M decodes through Quest's page buffer, labels every page with
Belady's discard bit, trains the predictor and compares it with the heuristic bits, LRU
and Belady on held-out prompts (kvjax.systems.page_predictor; deterministic training, 5-15 minutes
on 2 CPU cores).
"""

import json

from absl import flags

from kvjax import cli
from kvjax.systems import page_predictor

FLAGS = flags.FLAGS
flags.DEFINE_bool("write", False, "Rewrite kvjax/cache/page_predictor.py's TRAINED weights.")
flags.DEFINE_integer("hidden", 4, "Hidden units (0: logistic regression).")
flags.DEFINE_integer("device_pages", 12, "Buffer frames per row and KV head (the labels' "
                     "capacity).")
flags.DEFINE_integer("max_new_tokens", 24, "Decode steps recorded per prompt.")
flags.DEFINE_integer("horizon", page_predictor.HORIZON, "Censoring: in the recording's last "
                     "HORIZON steps, pages not read again give no example (0: keep all).")
flags.DEFINE_string("json_out", None, "Write the report here.")


def main(argv):
  del argv
  cli.check_single_process()
  report = page_predictor.run(write=FLAGS.write, hidden=FLAGS.hidden,
                              device_pages=FLAGS.device_pages,
                              max_new_tokens=FLAGS.max_new_tokens, horizon=FLAGS.horizon)
  print(json.dumps(report, indent=1))
  if FLAGS.json_out:
    cli.write_json(FLAGS.json_out, {**report, "config": cli.run_config()})


if __name__ == "__main__":
  cli.run(main)
