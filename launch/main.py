"""synth_med entry point: `python launch/main.py --config=configs/derm_classifier.py[:smoke] --workdir=DIR`."""


if __name__ == "__main__":  # before JAX loads: huge pages for XLA's per-step buffers (Linux, glibc >= 2.35)
  from synth_med.train.host_memory import reexec_with_huge_pages  # noqa: E402
  reexec_with_huge_pages()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from synth_med.experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output folder; a rerun resumes from it.")


def main(argv):
  del argv
  cli.run_main(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
