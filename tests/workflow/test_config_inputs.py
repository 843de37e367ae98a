"""Config inputs as a user types them: every invalid one is a ValueError naming the field, the value and what is
allowed; valid edge cases are read exactly; the command line turns expected errors into one line on stderr."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import warnings
from typing import Any, NamedTuple

import numpy as np
import pytest

from fedjaxpriv.config import ClientConfig, ExperimentConfig, from_dict, load_config, with_overrides


class Case(NamedTuple):
    """One input: ``how`` is "set" (command-line overrides), "map" (a mapping of dotted overrides), "dict"
    (``from_dict``), or "yaml"/"json" (a config file's text); ``fragment`` must be in the error."""

    how: str
    given: Any
    fragment: str


def S(text: str | list[str], fragment: str) -> Case:
    return Case("set", text, fragment)


FIN = "a finite number"
POS = f"{FIN} > 0"
NONNEG = f"{FIN} >= 0"
FRAC = f"{FIN} in [0, 1)"
PC = ", or a list of them (tier values, or one per client)"
BOOL = "allowed: true or false"
STR = "allowed: a string"
INT = "an integer in [1, 2147483647]"


def bad(field: str, shown: str, allowed: str) -> str:
    return f"{field}={shown} is invalid; allowed: {allowed}"


INVALID: list[Case] = [
    # data
    Case("dict", {"data": {"dataset": 5}}, bad("data.dataset", "5", "a string")),
    S("data.dataset=mnsit", "data.dataset='mnsit' is invalid; allowed: one of ['digits', 'mnist'"),
    S("data.dataset=tfds:", "data.dataset='tfds:' is invalid; allowed: one of"),
    S("model.name=resnet50", "model.name='resnet50' is invalid; allowed: one of ['logreg', 'mlp', 'cnn'"),
    S("model.name=MLP", "model.name='MLP' is invalid; allowed: one of"),
    Case("dict", {"data": {"data_dir": 7}}, bad("data.data_dir", "7", "a string, or null")),
    Case("dict", {"data": {"image_key": None}}, bad("data.image_key", "None", "a string")),
    Case("dict", {"data": {"client_column": 3}}, bad("data.client_column", "3", "a string, or null")),
    Case("dict", {"data": {"label_key": ["label"]}}, "data.label_key=['label'] is invalid; " + STR),
    S("data.download=maybe", "data.download='maybe' is invalid; " + BOOL),
    S("data.download=2", "data.download=2 is invalid; " + BOOL),
    S("data.download=0", "data.download=0 is invalid; " + BOOL),
    S("data.download=null", "data.download=None is invalid; " + BOOL),
    S("data.download=[true]", "data.download=[True] is invalid; " + BOOL),
    S("data.partition=random", "data.partition='random' is invalid; allowed: one of ['iid', 'dirichlet'"),
    S("data.partition=IID", "data.partition='IID' is invalid; allowed: one of"),
    S("data.partition=", "data.partition='' is invalid; allowed: one of"),
    S("data.num_clients=0", bad("data.num_clients", "0", INT)),
    S("data.num_clients=-1", bad("data.num_clients", "-1", INT)),
    S("data.num_clients=2.5", bad("data.num_clients", "2.5", INT)),
    S("data.num_clients=true", bad("data.num_clients", "'true'", INT)),
    S("data.num_clients=abc", bad("data.num_clients", "'abc'", INT)),
    S("data.num_clients=inf", bad("data.num_clients", "inf", INT)),
    S("data.num_clients=1e10", bad("data.num_clients", "10000000000.0", INT)),
    S("data.num_clients=null", bad("data.num_clients", "'null'", INT)),
    S("data.num_clients=[5]", bad("data.num_clients", "[5]", INT)),
    S("data.dirichlet_alpha=0", bad("data.dirichlet_alpha", "0", POS)),
    S("data.dirichlet_alpha=-1", bad("data.dirichlet_alpha", "-1", POS)),
    S("data.dirichlet_alpha=inf", bad("data.dirichlet_alpha", "inf", POS)),
    S("data.dirichlet_alpha=.nan", bad("data.dirichlet_alpha", "nan", POS)),
    S("data.dirichlet_alpha=true", bad("data.dirichlet_alpha", "'true'", POS)),
    S("data.dirichlet_alpha=abc", bad("data.dirichlet_alpha", "'abc'", POS)),
    S("data.shards_per_client=0", bad("data.shards_per_client", "0", INT)),
    S("data.shards_per_client=1.5", bad("data.shards_per_client", "1.5", INT)),
    S("data.quantity_sigma=inf", bad("data.quantity_sigma", "inf", f"{FIN} in [0, 50]")),
    S("data.quantity_sigma=.inf", bad("data.quantity_sigma", "inf", f"{FIN} in [0, 50]")),
    S("data.quantity_sigma=-0.1", bad("data.quantity_sigma", "-0.1", f"{FIN} in [0, 50]")),
    S("data.quantity_sigma=51", bad("data.quantity_sigma", "51", f"{FIN} in [0, 50]")),
    S("data.quantity_sigma=nan", bad("data.quantity_sigma", "nan", f"{FIN} in [0, 50]")),
    S("data.synthetic_alpha=-1", bad("data.synthetic_alpha", "-1", NONNEG)),
    S("data.synthetic_alpha=inf", bad("data.synthetic_alpha", "inf", NONNEG)),
    S("data.synthetic_beta=-1e-3", bad("data.synthetic_beta", "-0.001", NONNEG)),
    S("data.synthetic_beta=NaN", bad("data.synthetic_beta", "nan", NONNEG)),
    S("data.synthetic_max_size=0", bad("data.synthetic_max_size", "0", INT + ", or null")),
    S("data.synthetic_max_size=2.5", bad("data.synthetic_max_size", "2.5", INT + ", or null")),
    S("data.synthetic_max_size=inf", bad("data.synthetic_max_size", "inf", INT + ", or null")),
    S("data.sequence_length=0", bad("data.sequence_length", "0", "an integer in [1, 4096]")),
    S("data.sequence_length=5000", bad("data.sequence_length", "5000", "an integer in [1, 4096]")),
    S("data.vocabulary_size=2", bad("data.vocabulary_size", "2", "an integer in [3, 10000000]")),
    S("data.vocabulary_size=1.5", bad("data.vocabulary_size", "1.5", "an integer in [3, 10000000]")),
    S("data.train_files=5", bad("data.train_files", "5", "a list, each a string")),
    S("data.test_files=[1, 2]", bad("data.test_files", "[1, 2]", "a list, each a string")),
    S("data.text_level=byte", bad("data.text_level", "'byte'", "one of ['char', 'word'], or null")),
    S("data.flwr_partitioner=IidPartitioner", bad("data.flwr_partitioner", "'IidPartitioner'",
                                                  "a Flower Datasets partitioner class name")),
    S(["data.partition=flwr"], bad("data.flwr_partitioner", "None", "a Flower Datasets partitioner class name")),
    # model
    S("model.hidden=[0]", bad("model.hidden", "[0]", "a list, each " + INT)),
    S("model.hidden=[-1]", bad("model.hidden", "[-1]", "a list, each " + INT)),
    S("model.hidden=[2.5]", bad("model.hidden", "[2.5]", "a list, each " + INT)),
    S("model.hidden=[true]", bad("model.hidden", "[True]", "a list, each " + INT)),
    S("model.hidden=[abc]", bad("model.hidden", "['abc']", "a list, each " + INT)),
    S("model.hidden=0", bad("model.hidden", "0", "a list, each " + INT)),
    S("model.hidden=[64, inf]", bad("model.hidden", "[64, 'inf']", "a list, each " + INT)),
    Case("dict", {"model": {"name": 3}}, "model.name=3 is invalid; " + STR),
    # client
    S("client.local_steps=2.5", bad("client.local_steps", "2.5", "an integer in [0, 1000000]" + PC)),
    S("client.local_steps=-1", bad("client.local_steps", "-1", "an integer in [0, 1000000]")),
    S("client.local_steps=1e7", bad("client.local_steps", "10000000.0", "an integer in [0, 1000000]")),
    S("client.local_steps=true", bad("client.local_steps", "'true'", "an integer in [0, 1000000]")),
    S("client.local_steps=abc", bad("client.local_steps", "'abc'", "an integer in [0, 1000000]")),
    S("client.local_steps=[1, 2.5]", bad("client.local_steps", "[1, 2.5]", "an integer in [0, 1000000]")),
    S("client.local_steps=[]", bad("client.local_steps", "[]", "an integer in [0, 1000000]")),
    S("client.local_steps=inf", bad("client.local_steps", "inf", "an integer in [0, 1000000]")),
    S("client.local_steps=null", bad("client.local_steps", "'null'", "an integer in [0, 1000000]")),
    S("client.local_steps=[[1]]", bad("client.local_steps", "[[1]]", "an integer in [0, 1000000]")),
    S("client.batch_size=0", bad("client.batch_size", "0", "an integer in [1, 1000000]")),
    S("client.batch_size=0.5", bad("client.batch_size", "0.5", "an integer in [1, 1000000]")),
    S("client.batch_size=[0, 4]", bad("client.batch_size", "[0, 4]", "an integer in [1, 1000000]")),
    S("client.batch_size=true", bad("client.batch_size", "'true'", "an integer in [1, 1000000]")),
    S("client.lr=0", bad("client.lr", "0", POS + PC)),
    S("client.lr=-0.1", bad("client.lr", "-0.1", POS)),
    S("client.lr=inf", bad("client.lr", "inf", POS)),
    S("client.lr=nan", bad("client.lr", "nan", POS)),
    S("client.lr=.nan", bad("client.lr", "nan", POS)),
    S("client.lr=[0.1, 0]", bad("client.lr", "[0.1, 0]", POS)),
    S("client.lr=[0.1, inf]", bad("client.lr", "[0.1, 'inf']", POS)),
    S("client.lr=true", bad("client.lr", "'true'", POS)),
    S("client.lr=abc", bad("client.lr", "'abc'", POS)),
    S("client.lr=", bad("client.lr", "''", POS)),
    S("client.lr=[]", bad("client.lr", "[]", POS)),
    S("client.lr=[0.1,", "client.lr='[0.1,' is invalid (invalid YAML"),
    S("client.lr={a: 1}", bad("client.lr", "{'a': 1}", POS)),
    S("client.momentum=1", bad("client.momentum", "1", FRAC)),
    S("client.momentum=-0.1", bad("client.momentum", "-0.1", FRAC)),
    S("client.momentum=inf", bad("client.momentum", "inf", FRAC)),
    S("client.momentum=true", bad("client.momentum", "'true'", FRAC)),
    S("client.momentum=[0.5]", bad("client.momentum", "[0.5]", FRAC)),
    S("client.prox_mu=-1", bad("client.prox_mu", "-1", NONNEG)),
    S("client.prox_mu=inf", bad("client.prox_mu", "inf", NONNEG)),
    S("client.sampling=random", "client.sampling='random' is invalid; allowed: one of ['fixed', 'poisson']"),
    S("client.sampling=Fixed", "client.sampling='Fixed' is invalid; allowed: one of ['fixed', 'poisson']"),
    S("client.mixup_alpha=-1", bad("client.mixup_alpha", "-1", NONNEG)),
    S("client.mixup_alpha=inf", bad("client.mixup_alpha", "inf", NONNEG)),
    S("client.prune_sparsity=1", bad("client.prune_sparsity", "1", FRAC)),
    S("client.prune_sparsity=-0.1", bad("client.prune_sparsity", "-0.1", FRAC)),
    S("client.prune_sparsity=[0.5, 1.0]", bad("client.prune_sparsity", "[0.5, 1.0]", FRAC)),
    S("client.prune_method=l1", "client.prune_method='l1' is invalid; allowed: one of ['magnitude', 'random']"),
    S("client.prune_scope=network", "client.prune_scope='network' is invalid; allowed: one of ['layer', 'global']"),
    S("client.dp_clip_norm=0", bad("client.dp_clip_norm", "0", "a number > 0, or inf")),
    S("client.dp_clip_norm=-1", bad("client.dp_clip_norm", "-1", "a number > 0, or inf")),
    S("client.dp_clip_norm=nan", bad("client.dp_clip_norm", "nan", "a number > 0, or inf")),
    S("client.dp_clip_norm=-inf", bad("client.dp_clip_norm", "-inf", "a number > 0, or inf")),
    S("client.dp_clip_norm=true", bad("client.dp_clip_norm", "'true'", "a number > 0, or inf")),
    S("client.dp_noise_multiplier=-1", bad("client.dp_noise_multiplier", "-1", NONNEG)),
    S("client.dp_noise_multiplier=inf", bad("client.dp_noise_multiplier", "inf", NONNEG)),
    S("client.target_epsilon=0", bad("client.target_epsilon", "0", POS)),
    S("client.target_epsilon=inf", bad("client.target_epsilon", "inf", POS)),
    S("client.target_epsilon=[1, -1]", bad("client.target_epsilon", "[1, -1]", POS)),
    S("client.prune_begin_round=-1", bad("client.prune_begin_round", "-1", "an integer in [0, 2147483647]")),
    S("client.prune_begin_round=1.5", bad("client.prune_begin_round", "1.5", "an integer in [0, 2147483647]")),
    S("client.prune_end_round=true", bad("client.prune_end_round", "'true'", "an integer in [0, 2147483647]")),
    S(["client.prune_begin_round=5", "client.prune_end_round=2"],
      "client.prune_end_round=2 is invalid; allowed: an integer >= client.prune_begin_round=5"),
    S(["data.num_clients=20", "client.lr=[" + ", ".join(["0.1"] * 17) + "]"],
      "up to 16 tier values, or exactly data.num_clients=20 values (got 17)"),
    # message
    S("message.order=[clip, foo]", "message.order=['clip', 'foo'] is invalid; allowed: a list, each one of"),
    S("message.order=[clip, clip]", "message.order=('clip', 'clip') is invalid; allowed: each stage at most once"),
    S("message.order=foo", "message.order='foo' is invalid; allowed: a list, each one of"),
    S("message.order=[1]", "message.order=[1] is invalid; allowed: a list, each one of"),
    S("message.sparsity=1", bad("message.sparsity", "1", FRAC)),
    S("message.topk_fraction=0", bad("message.topk_fraction", "0", f"{FIN} in (0, 1]")),
    S("message.topk_fraction=1.5", bad("message.topk_fraction", "1.5", f"{FIN} in (0, 1]")),
    S("message.randk_fraction=0", bad("message.randk_fraction", "0", f"{FIN} in (0, 1]")),
    S("message.randk_fraction=-0.5", bad("message.randk_fraction", "-0.5", f"{FIN} in (0, 1]")),
    S("message.clip_norm=0", bad("message.clip_norm", "0", "a number > 0, or inf")),
    S("message.clip_norm=-1", bad("message.clip_norm", "-1", "a number > 0, or inf")),
    S("message.local_noise_multiplier=-1", bad("message.local_noise_multiplier", "-1", NONNEG)),
    S("message.local_noise_multiplier=1", "message.clip_norm=inf is invalid; allowed: finite whenever"),
    S(["message.local_noise_multiplier=1", "message.clip_norm=1", "message.order=[noise, clip]"],
      "allowed: 'clip' before 'noise'"),
    S(["message.local_noise_multiplier=1", "message.clip_norm=1", "message.order=[clip, topk, noise]",
       "message.topk_fraction=0.1", "message.error_feedback=true"],
      "allowed: no compressor between 'clip' and 'noise' with message.error_feedback=true (got ['topk']"),
    # A knob whose stage message.order leaves out would never be applied.
    S(["message.order=[]", "message.quant_bits=4"],
      "message.quant_bits=4 sets stage 'round', which message.order=[] leaves out: it would never be applied"),
    S(["message.order=[clip]", "message.topk_fraction=0.1", "message.error_feedback=true"],
      "message.topk_fraction=0.1 sets stage 'topk', which message.order=['clip'] leaves out"),
    S(["message.order=[prune, topk]", "message.qsgd_levels=[0, 4]"],
      "message.qsgd_levels=(0, 4) sets stage 'qsgd'"),
    S(["message.order=[topk]", "message.clip_norm=1"], "message.clip_norm=1.0 sets stage 'clip'"),
    S("message.quant_bits=33", bad("message.quant_bits", "33", "an integer in [0, 32]")),
    S("message.quant_bits=2.5", bad("message.quant_bits", "2.5", "an integer in [0, 32]")),
    S("message.quant_bits=-1", bad("message.quant_bits", "-1", "an integer in [0, 32]")),
    S("message.quant_bits=true", bad("message.quant_bits", "'true'", "an integer in [0, 32]")),
    S("message.qsgd_levels=-1", bad("message.qsgd_levels", "-1", "an integer in [0, 1073741824]")),
    S("message.qsgd_levels=1.5", bad("message.qsgd_levels", "1.5", "an integer in [0, 1073741824]")),
    S("message.qsgd_levels=2147483648", bad("message.qsgd_levels", "2147483648", "an integer in [0, 1073741824]")),
    # server
    S("server.algorithm=fedadam", "server.algorithm='fedadam' is invalid; allowed: one of ['fedavg'"),
    S("server.ditto_lambda=-0.5", bad("server.ditto_lambda", "-0.5", NONNEG)),
    S("server.ditto_lambda=inf", bad("server.ditto_lambda", "inf", NONNEG)),
    S("server.optimizer=adagrad", "server.optimizer='adagrad' is invalid; allowed: one of ['sgd'"),
    S("server.lr=0", bad("server.lr", "0", POS)),
    S("server.lr=inf", bad("server.lr", "inf", POS)),
    S("server.lr=-1", bad("server.lr", "-1", POS)),
    S("server.lr=nan", bad("server.lr", "nan", POS)),
    S("server.lr=[1.0]", bad("server.lr", "[1.0]", POS)),
    S("server.momentum=1", bad("server.momentum", "1", FRAC)),
    S("server.adam_b1=1", bad("server.adam_b1", "1", FRAC)),
    S("server.adam_b1=-0.1", bad("server.adam_b1", "-0.1", FRAC)),
    S("server.adam_b1=1.5", bad("server.adam_b1", "1.5", FRAC)),
    S("server.adam_b2=1", bad("server.adam_b2", "1", FRAC)),
    S("server.adam_b2=inf", bad("server.adam_b2", "inf", FRAC)),
    S("server.adam_eps=0", bad("server.adam_eps", "0", POS)),
    S("server.adam_eps=-1e-8", bad("server.adam_eps", "-1e-08", POS)),
    S("server.adam_eps=inf", bad("server.adam_eps", "inf", POS)),
    S("server.clients_per_round=0", bad("server.clients_per_round", "0", INT)),
    S("server.clients_per_round=2.5", bad("server.clients_per_round", "2.5", INT)),
    S("server.clients_per_round=51", "server.clients_per_round=51 is invalid; allowed: at most data.num_clients=50"),
    S("server.client_sampling=random", "server.client_sampling='random' is invalid; allowed: one of"),
    S("server.weighting=size", "server.weighting='size' is invalid; allowed: one of ['examples', 'uniform']"),
    S("server.central_clip_norm=0", bad("server.central_clip_norm", "0", "a number > 0, or inf")),
    S("server.central_clip_norm=-1", bad("server.central_clip_norm", "-1", "a number > 0, or inf")),
    S("server.central_noise_multiplier=-1", bad("server.central_noise_multiplier", "-1", NONNEG)),
    S("server.central_noise_multiplier=inf", bad("server.central_noise_multiplier", "inf", NONNEG)),
    S("server.central_noise_multiplier=1", "server.central_clip_norm=inf is invalid; allowed: a finite clip norm"),
    S("server.adaptive_clip_quantile=0", bad("server.adaptive_clip_quantile", "0", f"{FIN} in (0, 1)")),
    S("server.adaptive_clip_quantile=1", bad("server.adaptive_clip_quantile", "1", f"{FIN} in (0, 1)")),
    S("server.adaptive_clip_quantile=0.5", "server.central_clip_norm=inf is invalid; allowed: a finite initial"),
    S("server.adaptive_clip_lr=0", bad("server.adaptive_clip_lr", "0", POS)),
    S("server.adaptive_clip_lr=-1", bad("server.adaptive_clip_lr", "-1", POS)),
    S("server.clip_count_noise_multiplier=0", bad("server.clip_count_noise_multiplier", "0", POS)),
    S("server.clip_count_noise_multiplier=-1", bad("server.clip_count_noise_multiplier", "-1", POS)),
    S("server.target_epsilon=0", bad("server.target_epsilon", "0", POS)),
    S("server.target_epsilon=inf", bad("server.target_epsilon", "inf", POS)),
    S("server.target_epsilon=2", "server.central_clip_norm=inf is invalid; allowed: a finite clip norm when"),
    S("server.algorithm=fedprox", "client.prox_mu=0.0 is invalid; allowed: a value > 0 when"),
    # run
    S("run.log=[jsonl,mlflow]", bad("run.log", "['jsonl', 'mlflow']", "a list, each one of ['jsonl', 'tensorboard', "
                                                                      "'wandb'] (jsonl is always on)")),
    S("run.shard_data=maybe", "run.shard_data='maybe' is invalid; " + BOOL),
    S("run.rounds=0", bad("run.rounds", "0", INT)),
    S("run.rounds=true", bad("run.rounds", "'true'", INT)),
    S("run.rounds=2.5", bad("run.rounds", "2.5", INT)),
    S("run.rounds=-1", bad("run.rounds", "-1", INT)),
    S("run.rounds=1e10", bad("run.rounds", "10000000000.0", INT)),
    S("run.rounds=abc", bad("run.rounds", "'abc'", INT)),
    S("run.seed=-1", bad("run.seed", "-1", "an integer in [0, 4294967295]")),
    S("run.seed=4294967296", bad("run.seed", "4294967296", "an integer in [0, 4294967295]")),
    S("run.seed=99999999999999999999", bad("run.seed", "99999999999999999999", "an integer in [0, 4294967295]")),
    S("run.seed=1.5", bad("run.seed", "1.5", "an integer in [0, 4294967295]")),
    S("run.seed=true", bad("run.seed", "'true'", "an integer in [0, 4294967295]")),
    S("run.eval_every=0", bad("run.eval_every", "0", INT)),
    S("run.chunk_size=-1", bad("run.chunk_size", "-1", "an integer in [0, 2147483647]")),
    S("run.num_devices=-1", bad("run.num_devices", "-1", "an integer in [0, 2147483647]")),
    S("run.strategy=gpu", "run.strategy='gpu' is invalid; allowed: one of ['auto', 'vmap', 'loop', 'host']"),
    S("run.checkpoint_every=-1", bad("run.checkpoint_every", "-1", "an integer in [0, 2147483647]")),
    S("run.checkpoint_every=1.5", bad("run.checkpoint_every", "1.5", "an integer in [0, 2147483647]")),
    S("run.delta=0", bad("run.delta", "0", f"{FIN} in (0, 1)")),
    S("run.delta=1", bad("run.delta", "1", f"{FIN} in (0, 1)")),
    S("run.delta=-1e-5", bad("run.delta", "-1e-05", f"{FIN} in (0, 1)")),
    S("run.delta=inf", bad("run.delta", "inf", f"{FIN} in (0, 1)")),
    S("run.delta=nan", bad("run.delta", "nan", f"{FIN} in (0, 1)")),
    S("run.accountant=gdp", "run.accountant='gdp' is invalid; allowed: one of ['rdp', 'pld']"),
    S("run.divergence_factor=1", "run.divergence_factor=1 is invalid; allowed: a finite number > 1"),
    S("run.divergence_factor=inf", "run.divergence_factor=inf is invalid; allowed: a finite number > 1"),
    S("run.tap_clients=[-1]", bad("run.tap_clients", "[-1]", "a list, each an integer in [0, 2147483647]")),
    S("run.tap_clients=[1.5]", bad("run.tap_clients", "[1.5]", "a list, each an integer in [0, 2147483647]")),
    S("run.tap_clients=[50]", "run.tap_clients=(50,) is invalid; allowed: client ids < data.num_clients=50"),
    S("run.tap_rounds=[0]", bad("run.tap_rounds", "[0]", "a list, each " + INT)),
    S("run.tap_rounds=[true]", bad("run.tap_rounds", "[True]", "a list, each " + INT)),
    S("run.tap_rounds=[41]", "run.tap_rounds=(41,) is invalid; allowed: round numbers in [1, run.rounds=40]"),
    # topology
    S("topology.graph=star", "topology.graph='star' is invalid; allowed: one of ['none', 'ring', 'torus'"),
    S("topology.edge_probability=0", bad("topology.edge_probability", "0", f"{FIN} in (0, 1]")),
    S("topology.edge_probability=1.5", bad("topology.edge_probability", "1.5", f"{FIN} in (0, 1]")),
    S("topology.gossip=lossy", "topology.gossip='lossy' is invalid; allowed: one of ['exact', 'choco']"),
    S("topology.consensus_step=0", bad("topology.consensus_step", "0", f"{FIN} in (0, 1]")),
    S(["topology.graph=ring", "topology.consensus_step=0.5"], "topology.consensus_step=0.5 is invalid; allowed: 1.0 "
      "with topology.gossip='exact'"),
    S("topology.node_dropout=1", bad("topology.node_dropout", "1", f"{FIN} in [0, 1), or a list of them")),
    S("topology.node_dropout=0.1", "topology.node_dropout=0.1 is invalid; allowed: 0 without topology.graph"),
    S(["topology.graph=ring", "topology.gossip=choco", "topology.consensus_step=0.5", "topology.node_dropout=0.1"],
      "topology.node_dropout=0.1 is invalid; allowed: 0 with topology.gossip='choco'"),
    S(["topology.graph=ring", "topology.node_dropout=0.1", "run.tap_clients=[1]", "run.tap_rounds=[1]"],
      "topology.node_dropout=0.1 is invalid; allowed: 0 with taps"),
    S(["topology.graph=ring", "server.lr=0.5"], "topology.graph='ring' is invalid; allowed: 'none' with server.lr=0.5:"
      " a decentralized run has no server"),
    S(["topology.graph=ring", "server.central_clip_norm=1", "server.central_noise_multiplier=1"], "allowed: 'none' "
      "with server.central_clip_norm=1.0, server.central_noise_multiplier=1.0: a decentralized run has no server"),
    S(["topology.graph=torus", "data.num_clients=10"], "data.num_clients=10 is invalid; allowed: a square number of "
      "nodes with topology.graph='torus'"),
    S(["topology.graph=random_matching", "run.tap_clients=[1]"], "run.tap_clients=[1] is invalid; allowed: [] with "
      "topology.graph='random_matching' (a new neighbour every round: no fixed curious neighbour to tap)"),
    S(["topology.graph=exponential", "devices.policy=uniform"], "devices.policy='uniform' is invalid; allowed: 'none'"
      " with topology.graph='exponential'"),
    S(["topology.graph=ring", "run.strategy=host"], "run.strategy='host' is invalid; allowed: one of ['auto', "
      "'vmap', 'loop'] with topology.graph='ring'"),
    # devices
    S("devices.policy=fast", "devices.policy='fast' is invalid; allowed: one of ['none', 'uniform', 'device_aware']"),
    S("devices.jitter=-1", bad("devices.jitter", "-1", f"{FIN} in [0, 10]")),
    S("devices.jitter=11", bad("devices.jitter", "11", f"{FIN} in [0, 10]")),
    S("devices.round_deadline_s=0", bad("devices.round_deadline_s", "0", POS)),
    S("devices.round_deadline_s=inf", bad("devices.round_deadline_s", "inf", POS)),
    S("devices.stragglers=wait", "devices.stragglers='wait' is invalid; allowed: one of ['drop', 'fewer_steps']"),
    S("devices.max_local_steps=0", bad("devices.max_local_steps", "0", "an integer in [1, 1000000]")),
    S("devices.max_local_steps=1.5", bad("devices.max_local_steps", "1.5", "an integer in [1, 1000000]")),
    S("devices.train_memory_factor=0", bad("devices.train_memory_factor", "0", POS)),
    S("devices.privacy_tiers=maybe", "devices.privacy_tiers='maybe' is invalid; " + BOOL),
    S("devices.privacy_tiers=1", "devices.privacy_tiers=1 is invalid; " + BOOL),
    S("devices.tiers=[1]", "devices.tiers=[1] is invalid; allowed: a list, each a mapping"),
    S("devices.tiers=[{name: a, probability: 1, speed: 3}]", "devices.tiers[0] has unknown field(s) ['speed']"),
    S("devices.tiers=[{name: a}]", "devices.tiers[0]={'name': 'a'} is invalid; allowed: a mapping with at least"),
    S("devices.tiers=[{name: a, probability: 1, flops_per_s: abc, memory_bytes: 1, uplink_bps: 1}]",
      "devices.tiers[0].flops_per_s='abc' is invalid; allowed: a number"),
    S("devices.tiers=[{name: 3, probability: 1, flops_per_s: 1, memory_bytes: 1, uplink_bps: 1}]",
      "devices.tiers[0].name=3 is invalid; allowed: a string"),
    # keys
    S("client.nonexistent=1", "unknown field(s) ['client.nonexistent']; allowed: ["),
    S("clients.lr=0.1", "unknown config section 'clients' in 'clients.lr'; allowed: ['name', 'data'"),
    S("lr=0.1", "override key 'lr' must be section.field (e.g. client.lr) or name"),
    S("client.lr", "override 'client.lr' must look like section.field=value"),
    S("a.b.c=1", "override key 'a.b.c' must be section.field"),
    S("client.=1", "override key 'client.' must be section.field"),
    Case("map", {"client.lr": "abc"}, bad("client.lr", "'abc'", POS)),
    Case("map", {"run.rounds": 2.5}, bad("run.rounds", "2.5", INT)),
    Case("map", {"data.download": "maybe"}, "data.download='maybe' is invalid; " + BOOL),
    Case("map", {"client.nonexistent": 1}, "unknown field(s) ['client.nonexistent']"),
    # mappings and files
    Case("dict", {"name": 5}, "name=5 is invalid; " + STR),
    Case("dict", {"client": 5}, "config section 'client' must be a mapping, got 5"),
    Case("dict", {"clients": {}}, "unknown config section(s) ['clients']; allowed: ['name', 'data'"),
    Case("dict", {"client": {"lr": 0.1, "speed": 1}}, "unknown field(s) ['client.speed']"),
    Case("dict", {"run": {"rounds": np.float64(2.5)}}, bad("run.rounds", "2.5", INT)),
    Case("yaml", "client:\n  lr: [0.1,\n", "invalid YAML at line 3, column 1"),
    Case("yaml", "client: {lr: 0.1\n", "invalid YAML at line 2"),
    Case("yaml", "- 1\n- 2\n", "must hold a mapping at top level, got list"),
    Case("yaml", "run:\n  rounds: true\n", bad("run.rounds", "True", INT)),
    Case("yaml", "data:\n  download: maybe\n", "data.download='maybe' is invalid; " + BOOL),
    Case("yaml", "client:\n  local_steps: 2.5\n", bad("client.local_steps", "2.5", "an integer in [0, 1000000]")),
    Case("yaml", "data:\n  dataset: 5\n", "data.dataset=5 is invalid; " + STR),
    Case("yaml", "server:\n  lr: .inf\n", bad("server.lr", "inf", POS)),
    Case("yaml", "server:\n  adam_b2: 1.0\n", bad("server.adam_b2", "1.0", FRAC)),
    Case("json", "{bad json", "is not valid JSON"),
    Case("json", '{"client": {"lr": NaN}}', bad("client.lr", "nan", POS)),
    Case("json", '{"client": {"lr": -Infinity}}', bad("client.lr", "-inf", POS)),
    Case("json", '{"run": {"rounds": 2.5}}', bad("run.rounds", "2.5", INT)),
    Case("json", '[1, 2]', "must hold a mapping at top level, got list"),
    Case("json", '{"config_hash": "x", "config": {"run": {"seed": -1}}}', bad("run.seed", "-1", "an integer in [0, ")),
    Case("missing", "nothing.yaml", "cannot be read: No such file or directory"),
]


def _apply(case: Case, tmp_path) -> ExperimentConfig:
    if case.how == "set":
        return with_overrides(ExperimentConfig(), [case.given] if isinstance(case.given, str) else case.given)
    if case.how == "map":
        return with_overrides(ExperimentConfig(), case.given)
    if case.how == "dict":
        return from_dict(case.given)
    path = tmp_path / (case.given if case.how == "missing" else f"config.{case.how}")
    if case.how != "missing":
        path.write_text(case.given)
    return load_config(str(path))


def test_the_table_is_large_and_covers_every_field():
    assert len(INVALID) >= 150
    named = " ".join(c.fragment for c in INVALID)
    for section in ("data", "model", "client", "message", "server", "run", "devices"):
        fields = ExperimentConfig().to_dict()[section]
        missing = [f for f in fields if f"{section}.{f}" not in named and f != "error_feedback"]
        assert not missing, f"no invalid input for {section}: {missing}"


@pytest.mark.parametrize("case", INVALID, ids=[f"{i}-{c.how}" for i, c in enumerate(INVALID)])
def test_invalid_input_is_a_clear_error(case, tmp_path):
    with pytest.raises(ValueError) as error:
        _apply(case, tmp_path)
    message = str(error.value)
    assert case.fragment in message
    assert "\n" not in message


VALID: list[tuple[Case, str, Any]] = [
    (S("client.lr=1e-2", ""), "client.lr", 0.01),
    (S("run.delta=1e-6", ""), "run.delta", 1e-6),
    (S("server.lr=1E3", ""), "server.lr", 1000.0),
    (S("client.lr=1", ""), "client.lr", 1.0),
    (S("client.dp_clip_norm=inf", ""), "client.dp_clip_norm", math.inf),
    (S("client.dp_clip_norm=.inf", ""), "client.dp_clip_norm", math.inf),
    (S("client.dp_clip_norm=Infinity", ""), "client.dp_clip_norm", math.inf),
    (S("server.central_clip_norm=+inf", ""), "server.central_clip_norm", math.inf),
    (S("client.local_steps=2.0", ""), "client.local_steps", 2),
    (S("client.local_steps=0", ""), "client.local_steps", 0),
    (S("client.lr=[0.1, 1e-2]", ""), "client.lr", (0.1, 0.01)),
    (S("message.quant_bits=[4, 8.0]", ""), "message.quant_bits", (4, 8)),
    (S("client.dp_clip_norm=[1, inf]", ""), "client.dp_clip_norm", (1.0, math.inf)),
    (S("data.download=true", ""), "data.download", True),
    (S("data.download=false", ""), "data.download", False),
    (S("name=2024", ""), "name", "2024"),
    (S("name='quoted name'", ""), "name", "quoted name"),
    (S("data.data_dir=null", ""), "data.data_dir", None),
    (S("data.data_dir=/tmp/data dir", ""), "data.data_dir", "/tmp/data dir"),
    (S("server.target_epsilon=null", ""), "server.target_epsilon", None),
    (S("client.target_epsilon=[1, 8]", ""), "client.target_epsilon", (1.0, 8.0)),
    (S("run.seed=4294967295", ""), "run.seed", 4294967295),
    (S("run.seed=1_000", ""), "run.seed", 1000),
    (S("client.local_steps=010", ""), "client.local_steps", 10),  # decimal, as in YAML 1.2 (not octal 8)
    (Case("yaml", "client:\n  local_steps: 010\n", ""), "client.local_steps", 10),
    (S("client.lr= 5e-2 ", ""), "client.lr", 0.05),
    (S("server.adam_b2=0.999", ""), "server.adam_b2", 0.999),
    (S("server.adam_b1=0", ""), "server.adam_b1", 0.0),
    (S("message.topk_fraction=1", ""), "message.topk_fraction", 1.0),
    (S("message.order=[]", ""), "message.order", ()),
    (S("message.order=clip", ""), "message.order", ("clip",)),
    (S("model.hidden=[]", ""), "model.hidden", ()),
    (S("model.hidden=128", ""), "model.hidden", (128,)),
    (S("run.tap_clients=[0, 49]", ""), "run.tap_clients", (0, 49)),
    (S("data.quantity_sigma=0", ""), "data.quantity_sigma", 0.0),
    (S("data.quantity_sigma=50", ""), "data.quantity_sigma", 50.0),
    (S(["data.num_clients=20", "client.lr=[" + ", ".join(["0.1"] * 20) + "]"], ""), "client.lr", (0.1,) * 20),
    (S("client.lr=[0.1, 0.2, 0.3]", ""), "client.lr", (0.1, 0.2, 0.3)),
    (Case("map", {"client.lr": "1e-3", "run.rounds": 3.0}, ""), "client.lr", 0.001),
    (Case("map", {"client.lr": [0.05, "1e-1"]}, ""), "client.lr", (0.05, 0.1)),
    (Case("dict", {"client": {"local_steps": np.array([1, 2])}}, ""), "client.local_steps", (1, 2)),
    (Case("yaml", "run:\n  delta: 1e-7\n", ""), "run.delta", 1e-7),
    (Case("yaml", "client:\n  dp_clip_norm: Infinity\n", ""), "client.dp_clip_norm", math.inf),
    (Case("yaml", "client:\n  lr: 5e-1\n", ""), "client.lr", 0.5),
    (Case("json", '{"client": {"dp_clip_norm": Infinity, "lr": 1e-2}}', ""), "client.dp_clip_norm", math.inf),
    (Case("json", '{"config_hash": "abc", "config": {"run": {"rounds": 3}}}', ""), "run.rounds", 3),
    (Case("yaml", "", ""), "run.rounds", 40),
]


def _get(config: ExperimentConfig, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("case,field,expected", VALID, ids=[f"{i}-{v[1]}" for i, v in enumerate(VALID)])
def test_valid_edge_case_is_read_exactly(case, field, expected, tmp_path):
    value = _get(_apply(case, tmp_path), field)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, tuple):
        assert [type(v) for v in value] == [type(v) for v in expected]


def test_enough_valid_edge_cases():
    assert len(VALID) >= 20


def test_python_construction_is_checked_by_the_same_rules():
    with pytest.raises(ValueError, match=r"client.local_steps=2.5 is invalid; allowed: an integer"):
        ClientConfig(local_steps=2.5)
    assert ClientConfig(lr=1, local_steps=3.0).lr == 1.0 and type(ClientConfig(local_steps=3.0).local_steps) is int


def test_same_meaning_same_hash():
    written = with_overrides(ExperimentConfig(), ["client.lr=[1, 2]", "client.local_steps=4.0"])
    typed = with_overrides(ExperimentConfig(), {"client.lr": (1.0, 2.0), "client.local_steps": 4})
    assert written.config_hash() == typed.config_hash()


def test_the_hash_covers_only_values_that_differ_from_the_defaults():
    config = with_overrides(ExperimentConfig(), ["client.lr=0.05", "name=x", "client.dp_clip_norm=2"])
    assert config.non_default() == {"name": "x", "client": {"lr": 0.05, "dp_clip_norm": 2.0}}
    # Written down once: a release that adds fields (at defaults that keep the old behaviour) keeps this hash,
    # so finished sweep points stay finished.
    assert config.config_hash() == "f5f62cfc8d74"
    assert with_overrides(config, ["client.lr=0.1"]).config_hash() != config.config_hash()
    assert with_overrides(config, ["server.lr=1.0"]).config_hash() == config.config_hash()  # 1.0 is the default


def test_a_run_directory_from_a_version_with_other_fields_loads_and_resumes(tmp_path):
    import json

    from fedjaxpriv.storage import RunStore

    config = with_overrides(ExperimentConfig(), ["client.lr=0.05", "run.rounds=3"])
    RunStore(str(tmp_path / "run"), config).close()
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    saved["config"]["client"]["future_knob"] = 3  # fields this version does not have, and another hash scheme
    saved["config"]["tracking"] = {"sink": "tensorboard"}
    saved["config_hash"] = "0123456789ab"
    path.write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"does not have: \['tracking', 'client.future_knob'\]"):
        assert load_config(str(path)) == config
    with pytest.warns(UserWarning, match="client.future_knob"):
        RunStore(str(tmp_path / "run"), config).close()  # resumes: the saved config decides, not its old hash
    with pytest.raises(ValueError, match="holds a run of a different config"), pytest.warns(UserWarning):
        RunStore(str(tmp_path / "run"), with_overrides(config, ["client.lr=0.1"]))
    # What the user writes is still checked strictly: a typo is an error, not a warning.
    (tmp_path / "mine.yaml").write_text("client:\n  future_knob: 3\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['client.future_knob'\]"):
        load_config(str(tmp_path / "mine.yaml"))


def test_a_run_directory_config_loads_back(tmp_path):
    from fedjaxpriv.storage import RunStore

    config = with_overrides(ExperimentConfig(), ["client.dp_clip_norm=2", "message.clip_norm=inf",
                                                 "client.lr=[0.1, 1e-2]", "run.delta=1e-7", "name=saved"])
    RunStore(str(tmp_path / "run"), config).close()  # writes config.json as every run does
    loaded = load_config(str(tmp_path / "run" / "config.json"))
    assert loaded == config and loaded.config_hash() == config.config_hash()


# -- command line ------------------------------------------------------------------------------------------------

def _cli(*args: str, cwd, in_process: bool = True) -> subprocess.CompletedProcess:
    """``fedjaxpriv ARGS`` run from ``cwd``: through ``cli.main`` in this process (an exception it lets through
    fails the test), or as a real process (``in_process=False``)."""
    if not in_process:
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
        return subprocess.run([sys.executable, "-m", "fedjaxpriv.cli", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
    from fedjaxpriv import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(list(args))
    return subprocess.CompletedProcess(["fedjaxpriv", *args], code, out.getvalue(), err.getvalue())


def _assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    # The error is one line; ``run`` may have said what it was building before the error stopped it.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("fedjaxpriv: building ")]
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fedjaxpriv: error: ") and fragment in lines[0]


def test_cli_bad_yaml_missing_file_and_bad_values(tmp_path):
    (tmp_path / "bad.yaml").write_text("client:\n  lr: [0.1,\n")
    _assert_one_line_error(_cli("run", "--config", "bad.yaml", cwd=tmp_path, in_process=False),
                           "invalid YAML at line 3")  # a real process: nothing but the line reaches stderr
    _assert_one_line_error(_cli("run", "--config", "absent.yaml", cwd=tmp_path), "cannot be read")
    _assert_one_line_error(_cli("sweep", "bad.yaml", cwd=tmp_path), "grid file 'bad.yaml': invalid YAML")
    _assert_one_line_error(_cli("run", "--set", "run.seed=99999999999999999999", cwd=tmp_path),
                           "run.seed=99999999999999999999 is invalid")
    _assert_one_line_error(_cli("run", "--set", "client.local_steps=2.5", cwd=tmp_path),
                           "client.local_steps=2.5 is invalid")
    (tmp_path / "onoff.yaml").write_text("client:\n  sampling: on\n")  # YAML 1.1 reads on as true
    _assert_one_line_error(_cli("run", "--config", "onoff.yaml", cwd=tmp_path),
                           "client.sampling=True is invalid; allowed: one of ['fixed', 'poisson'] (a YAML file "
                           "reads unquoted on/off/yes/no as true/false: quote the value)")


def test_cli_unusable_output_directories(tmp_path):
    (tmp_path / "afile").write_text("x")
    tiny = ["--set", "run.rounds=1", "--set", "data.num_clients=4", "--set", "server.clients_per_round=2"]
    _assert_one_line_error(_cli("run", *tiny, "--out", "afile", cwd=tmp_path), "--out='afile' is invalid: it is a file")
    _assert_one_line_error(_cli("run", *tiny, "--out", "afile/sub", cwd=tmp_path), "cannot be used as a directory")
    _assert_one_line_error(_cli("run", *tiny, "--out", "", cwd=tmp_path), "--out='' is invalid")
    _assert_one_line_error(_cli("report", "missing", cwd=tmp_path), "neither a results store")
    # A tfds dataset that is not prepared fails while the experiment is built, and leaves no empty --out behind.
    _assert_one_line_error(_cli("run", *tiny, "--set", "data.dataset=tfds:no_such_dataset", "--set",
                                f"data.data_dir={tmp_path / 'tfds'}", "--out", "new", cwd=tmp_path),
                           "tfds dataset 'no_such_dataset' is not prepared")
    assert os.listdir(tmp_path) == ["afile"]  # nothing trained, nothing written


@pytest.mark.parametrize("argv,expected", [
    ([], "fedjaxpriv: error: the following arguments are required: command (see fedjaxpriv --help)"),
    (["frobnicate"], "fedjaxpriv: error: argument command: invalid choice: 'frobnicate'"),
    (["run", "--bogus"], "fedjaxpriv: error: unrecognized arguments: --bogus (see fedjaxpriv --help)"),
    (["sweep", "grid.yaml", "--jobs", "x"],
     "fedjaxpriv sweep: error: argument --jobs: invalid int value: 'x' (see fedjaxpriv sweep --help)"),
])
def test_cli_usage_errors_are_one_line(argv, expected, capsys):
    from fedjaxpriv import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(expected), err


def test_cli_print_config_round_trips(tmp_path):
    printed = _cli("run", "--print-config", "--set", "run.delta=1e-7", "--set", "client.lr=[0.1, 1e-2]", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    (tmp_path / "my.yaml").write_text(printed.stdout)
    again = _cli("run", "--config", "my.yaml", "--print-config", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed.stdout
    assert json.loads(printed.stdout.replace("Infinity", "1e999"))["client"]["dp_clip_norm"] == math.inf


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "run:\n  rounds: 3\n  seed: 1\n  rounds: 5\n", r"line 4.*duplicate key 'rounds' \(first at line 2\)"),
    ("c.yaml", "client: {lr: 0.1}\nclient: {lr: 0.2}\n", r"duplicate key 'client' \(first at line 1\)"),
    ("c.json", '{"run": {"rounds": 3, "rounds": 5}}', r"c\.json.*duplicate key 'rounds'"),
])
def test_a_repeated_key_in_a_config_file_is_an_error_naming_it(tmp_path, name, text, message):
    from fedjaxpriv.config import load_file

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_file(str(path))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rounds=0), r"rounds=0 is not allowed: a positive number of rounds, or None for run\.rounds=1"),
    (dict(rounds=-1), r"rounds=-1 is not allowed"),
    (dict(rounds=2.5), r"rounds=2\.5 is not allowed"),
    (dict(rounds=2), r"rounds=2 is more than run\.rounds=1, the number the run is planned and recorded for"),
    (dict(out_dir=5), r"out_dir=5 is not allowed: a directory path"),
    (dict(loss_limit=-1), r"loss_limit=-1 is not allowed: a positive number"),
])
def test_run_arguments_are_checked_before_anything_runs(kwargs, message):
    from fedjaxpriv.config import from_dict
    from fedjaxpriv.experiment import Experiment

    experiment = Experiment(from_dict({"data": {"num_clients": 2}, "model": {"hidden": [4]},
                                       "server": {"clients_per_round": 2}, "run": {"rounds": 1, "checkpoint_every": 0}}))
    with pytest.raises(ValueError, match=message):
        experiment.run(progress=False, **kwargs)


def _api_calls():
    from fedjaxpriv.config import ExperimentConfig, from_dict, load_config, with_overrides
    from fedjaxpriv.experiment import Experiment

    small = from_dict({"data": {"num_clients": 4}, "model": {"hidden": [4]}, "server": {"clients_per_round": 2}})
    return [
        (lambda: with_overrides(ExperimentConfig(), ["client.lr=0.1", 5]), r"override 5 is invalid; allowed: text"),
        (lambda: with_overrides(ExperimentConfig(), 5), r"overrides=5 is invalid; allowed: a mapping or a list"),
        (lambda: with_overrides({}, []), r"config=\{\} is invalid; allowed: an ExperimentConfig"),
        (lambda: load_config(None), r"config file path=None is invalid; allowed: a file path"),
        (lambda: Experiment("config.yaml"), r"config='config.yaml' is invalid; allowed: an ExperimentConfig"),
        (lambda: Experiment(small, algorithm="scaffold"),
         r"algorithm='scaffold' is invalid; allowed: a FederatedAlgorithm .*set server.algorithm"),
        (lambda: with_overrides(small, {"server.client_sampling": "poisson", "server.clients_per_round": 5}),
         r"server.clients_per_round=5 is invalid; allowed: at most data.num_clients=4 \(Poisson sampling"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_python_entry_points_check_their_arguments(index):
    call, message = _api_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()


def test_report_names_the_run_config_it_cannot_read(tmp_path):
    from fedjaxpriv.results import record_from_run_dir

    (tmp_path / "history.jsonl").write_text('{"round": 1, "train_loss": 1.0}\n')
    (tmp_path / "config.json").write_text("{garbled")
    with pytest.raises(ValueError, match=r"run config '.*config.json' is not valid JSON"):
        record_from_run_dir(str(tmp_path))
    (tmp_path / "config.json").write_text('{"config_hash": "x", "config": {"client": {"lr": -1}}}')
    with pytest.raises(ValueError, match=r"run config '.*config.json' does not hold a config .*client.lr=-1"):
        record_from_run_dir(str(tmp_path))
    (tmp_path / "config.json").write_text('{"x": 1}')  # not a saved run's config: an unknown field is an error
    with pytest.raises(ValueError, match=r"run config '.*config.json' does not hold a config .*section\(s\) \['x'\]"):
        record_from_run_dir(str(tmp_path))
    (tmp_path / "config.json").write_text('{"config_hash": "x", "config": {"client": {"lr": 0.5}}}')
    assert record_from_run_dir(str(tmp_path))["config"]["client"]["lr"] == 0.5
    (tmp_path / "history.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"has no finished round \(history.jsonl is missing or empty\)"):
        record_from_run_dir(str(tmp_path))
