"""Old import path of the demo's procedural world: the same module as `t2iadapter.demo.world`.

Kept only because `demo/architecture.py` and `scripts/train_demo_base.py` (being retrained elsewhere) still
import `t2iadapter.world`; remove once both import `t2iadapter.demo.world`.
"""
import sys

from t2iadapter.demo import world as _world

sys.modules[__name__] = _world
