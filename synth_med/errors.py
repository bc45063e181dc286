"""The one exception type for user-facing problems (bad config, bad data, bad run)."""


class SynthMedError(Exception):
  """A problem the user can fix; the message names the problem and the fix.

  `launch/main.py` prints the message without a traceback and exits non-zero.
  """
