"""search_space.py: --space items and space files are read into typed spaces and grids."""
import json

import hyperparam_tuning as ht
import search_space


def test_space_items_are_typed_like_the_defaults():
    space = search_space.parse_space(["lr=0.01,0.05", "hidden-size=256,512x256", "flip=true,no",
                            "reg_lambda=1e-4:1e-2:log", "epochs=2:5", "activation=relu"])
    assert space["lr"] == {"choices": [0.01, 0.05]}
    assert space["hidden_size"] == {"choices": ["256x256", "512x256"]}
    assert space["flip"] == {"choices": [True, False]}
    assert space["reg"] == {"low": 1e-4, "high": 1e-2, "log": True, "int": False}
    assert space["epochs"] == {"low": 2, "high": 5, "log": False, "int": True}
    assert search_space.config_values({"hidden_size": "512x256"})["hidden_size"] == [512, 256]
    assert search_space.config_values({"hidden_size": 64})["hidden_size"] == [64, 64]
    assert len(search_space.grid({k: space[k] for k in ("lr", "hidden_size", "flip")})) == 8


def test_space_file_and_items_combine(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": [0.01, 0.05], "hidden_size": [256, [512, 256]],
                                "reg": {"low": 1e-5, "high": 1e-3, "log": True},
                                "activation": "relu,tanh"}))
    space = search_space.load_space_file(path)
    assert space["hidden_size"] == {"choices": ["256x256", "512x256"]}
    assert space["reg"]["log"] and space["activation"] == {"choices": ["relu", "tanh"]}
    args = ht.build_parser().parse_args(["--space-file", str(path), "--space", "lr=0.1",
                                         "--sampler", "tpe"])
    assert ht.make_plan(args)["space"]["lr"] == {"choices": [0.1]}  # the item wins
