"""The persistent compilation cache: off after ``import fedjax_bn``, on with one call, off by
the environment, and a warm second process compiles nothing, at the first process's learning
rate or another (hyperparameters are data: ``fedjax_bn/hyper.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROUND = """
import os
import jax, optax
from jax import monitoring
import fedjax_bn as fb
from fedjax_bn.data import digits_iid

print("imported", jax.config.jax_compilation_cache_dir)
fb.enable_compilation_cache()

events = {"requests": 0, "hits": 0}
def listen(name, **kw):
    if name == "/jax/compilation_cache/compile_requests_use_cache":
        events["requests"] += 1
    if name == "/jax/compilation_cache/cache_hits":
        events["hits"] += 1
monitoring.register_event_listener(listen)
print("dir", jax.config.jax_compilation_cache_dir)
data = digits_iid(num_clients=2, seed=0)
tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
alg = fb.fedavg(fb.SeedCNN(num_classes=10, widths=(2,), hidden=4), tx)
state = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
lr = float(os.environ["LR"])
state = fb.with_hyperparams(state, {"client.learning_rate": lr})
rnd = fb.make_round(alg, executor="sequential", batch_size=256)
state, _ = rnd(state, data.train, jax.random.key(1))
jax.block_until_ready(state)
print("requests", events["requests"], "hits", events["hits"])
"""


def run(env_value: str | None, lr: float = 0.1) -> dict[str, str]:
    env = dict(os.environ, LR=str(lr))
    env.pop("FEDJAX_BN_COMPILATION_CACHE", None)
    if env_value is not None:
        env["FEDJAX_BN_COMPILATION_CACHE"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", ROUND], env=env, capture_output=True, text=True, check=True
    )
    words = " ".join(out.stdout.split("\n")).split()
    return dict(zip(words[::2], words[1::2], strict=True))


def test_second_process_loads_every_program_from_the_cache(tmp_path: Path) -> None:
    cache = str(tmp_path / "jax-cache")
    cold, warm = run(cache), run(cache)
    assert cold["dir"] == warm["dir"] == cache
    assert int(cold["requests"]) > 0 and int(cold["hits"]) == 0
    assert int(warm["requests"]) == int(cold["requests"])
    assert int(warm["hits"]) == int(warm["requests"])  # nothing compiled again
    other_lr = run(cache, lr=0.03)  # a sweep's next point in a process of its own
    assert int(other_lr["requests"]) == int(cold["requests"])
    assert int(other_lr["hits"]) == int(other_lr["requests"])


def test_environment_variable_turns_it_off() -> None:
    off = run("0")
    assert off["dir"] == "None" and int(off["hits"]) == 0


def test_import_leaves_jax_configuration_alone(tmp_path: Path) -> None:
    on = run(str(tmp_path / "jax-cache"))
    assert on["imported"] == "None" and on["dir"] == str(tmp_path / "jax-cache")
