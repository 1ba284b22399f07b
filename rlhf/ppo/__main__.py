"""`accelerate launch -m rlhf.ppo --config FILE [--field value ...]`"""

import sys

from rlhf.ppo.stage import cli

sys.exit(cli(sys.argv[1:]))
