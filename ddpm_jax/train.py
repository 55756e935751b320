"""Train a DDPM: `python -m ddpm_jax.train --config configs/digits.py --workdir DIR`.

Override any config key from the command line, e.g.
`--config.training.batch_size=256`. The run resumes automatically from the
newest complete checkpoint in DIR. For several CPU processes pass
--coordinator_address/--num_processes/--process_id (see launch/local.sh); on
a TPU pod or a SLURM cluster multi-host start-up is detected automatically.
"""
import sys

from absl import app
from absl import flags

from ddpm_jax import cli
from ddpm_jax import cpu_memory
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/digits.py (or configs/digits.py:test).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
cli.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]} (every setting is a flag: "
          "--config.KEY=VALUE).", file=sys.stderr)
    sys.exit(1)
  cli.exit_on_user_error(cpu_memory.reuse_scratch)  # before JAX starts
  cli.quiet_orbax()
  # Imported after flag parsing so that `--help` is fast.
  from ddpm_jax import trainer  # pylint: disable=g-import-not-at-top

  def run():
    cli.initialize_processes()
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)

  # User errors (bad config, data, workdir) and divergence (NaN): a message.
  cli.exit_on_user_error(run, errors=cli.USER_ERRORS + (FloatingPointError,))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
