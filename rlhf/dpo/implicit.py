"""Where ``rlhf.online.loop`` imports the implicit reward from. It lives in ``rlhf.models.scoring``,
below eval, so jobs/eval.py scores a DPO policy without importing this package."""

from rlhf.models.scoring import load_implicit_reward as load_implicit_reward
