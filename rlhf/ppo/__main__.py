"""`accelerate launch -m rlhf.ppo --config FILE [--field value ...]`"""

import sys

from rlhf.cli import exit_process
from rlhf.ppo.stage import cli

exit_process(cli(sys.argv[1:]))
