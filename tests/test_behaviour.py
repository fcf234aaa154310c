"""The released code's behaviour on request (docs/protocol.md section 12 items 1-3): released
training masks against a literal NumPy transcription of the released generator, the drawn-rate
input as the model receives it inside the real train step, the nominal rate at evaluation, and
the switches as the commands set and record them."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ease_jax import train as T
from ease_jax.config import ModelConfig, TrainConfig, behaviour, replace
from ease_jax.data.missing import (
    MODALITIES,
    UNK_ID,
    apply_keep_masks,
    released_train_masks,
    train_missing_rates,
)
from ease_jax.evaluate import MaskBank

from helpers import tiny_data_and_model


class ReleasedGenerator:
    """Literal transcription of the released data set's training-mask code, as docs/protocol.md
    sections 2 and 12 describe it: `setup_seed(seed)` seeds NumPy's and Python's global
    generators; the rates are three `np.random.uniform(size=(N, 1))` draws; per modality
    `random.sample` over the list of sample indices picks int(N / 2) of them to zero; then one
    `generate_m` call per modality, each reseeding NumPy with the seed. Loops per instance, as
    released; not vectorised."""

    def __init__(self, text_ids, text_mask, audio, audio_lengths, vision, vision_lengths, seed):
        np.random.seed(seed)  # setup_seed
        random.seed(seed)
        n = len(text_ids)
        missing_rate = [np.random.uniform(size=(n, 1)) for _ in range(3)]
        for i in range(3):
            zeroed = random.sample([j for j in range(len(missing_rate[i]))],
                                   int(len(missing_rate[i]) / 2))
            missing_rate[i][zeroed] = 0
        self.rates = missing_rate
        self.text_m, self.text_keep = self.generate_m(text_ids, text_mask, None,
                                                      missing_rate[0], seed, "text")
        self.audio_m, self.audio_keep = self.generate_m(audio, None, audio_lengths,
                                                        missing_rate[1], seed, "audio")
        self.vision_m, self.vision_keep = self.generate_m(vision, None, vision_lengths,
                                                          missing_rate[2], seed, "vision")

    @staticmethod
    def generate_m(modality, input_mask, input_len, missing_rate, missing_seed, mode):
        if mode == "text":
            input_len = np.argmin(input_mask, axis=1)
        else:
            input_mask = np.array([[1] * int(length) + [0] * (modality.shape[1] - int(length))
                                   for length in input_len])
        np.random.seed(missing_seed)
        keep = (np.random.uniform(size=input_mask.shape) > missing_rate) * input_mask
        if mode == "text":
            for i, row in enumerate(keep):  # [CLS] and [SEP] unchanged
                row[0] = 1
                row[input_len[i] - 1] = 1
            out = keep * modality + UNK_ID * np.ones_like(modality) * (input_mask - keep)
        else:
            out = keep.reshape(modality.shape[0], modality.shape[1], 1) * modality
        return out, keep


def odd_split(n=11, seed=0):
    """A training split of an odd size (int(N / 2) rounds down) with every text length, a row
    without padding (argmin -> -1), frames of every length and utterance-level text features."""
    rng = np.random.default_rng(seed)
    l_len, t_a, t_v = 7, 5, 4
    text_len = np.concatenate([[l_len], rng.integers(2, l_len, n - 1)])
    text_mask = (np.arange(l_len)[None] < text_len[:, None]).astype(np.int64)
    text_ids = rng.integers(1000, 2000, (n, l_len)) * text_mask
    return {
        "text_ids": text_ids, "text_mask": text_mask, "text_types": np.zeros_like(text_mask),
        "text_features": rng.standard_normal((n, 1, 3)).astype(np.float32),
        "audio": rng.standard_normal((n, t_a, 2)).astype(np.float32),
        "audio_lengths": rng.integers(1, t_a + 1, n),
        "vision": rng.standard_normal((n, t_v, 3)).astype(np.float32),
        "vision_lengths": rng.integers(1, t_v + 1, n),
    }


@pytest.mark.parametrize("seed", [1111, 1113])
def test_released_masks_equal_the_transcribed_generator_over_two_epochs(seed):
    split = odd_split()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ref = ReleasedGenerator(split["text_ids"], split["text_mask"], split["audio"],
                                split["audio_lengths"], split["vision"], split["vision_lengths"],
                                seed)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    masks = released_train_masks(split, seed)
    np.testing.assert_array_equal(masks["text"], ref.text_keep.astype(bool))
    np.testing.assert_array_equal(masks["audio"], ref.audio_keep.astype(bool))
    np.testing.assert_array_equal(masks["vision"], ref.vision_keep.astype(bool))
    np.testing.assert_array_equal(masks["rate"],
                                  np.concatenate(ref.rates, 1).astype(np.float32))
    assert (masks["rate"] == 0).sum(0).tolist() == [5, 5, 5]  # int(11 / 2) per modality
    assert masks["text"][:, 0].all()  # [CLS] kept
    # Utterance-level features (one row) share the reseeded first uniform with audio / vision.
    np.testing.assert_array_equal(masks["text_features"][:, 0],
                                  np.random.RandomState(seed).uniform(size=11) > ref.rates[0][:, 0])
    # The masks the train step applies, in two epochs and a shuffled batch order: the released
    # loader's incomplete inputs, the same in both epochs (fixed masks).
    tcfg = TrainConfig(train_masks="released")
    state = T.create_state(tiny_model(), tcfg, seed, 3, train_split=split)
    order = np.array([4, 0, 9, 2, 10, 7, 1, 3, 8, 6, 5])
    batch = {k: v[order] for k, v in split.items()} | {"index": order}
    for epoch in (0, 1):
        st = state.replace(step=jnp.asarray(3 * epoch, jnp.int32))
        inputs, keep = T.train_inputs(st, batch, n_train=11, steps_per_epoch=3,
                                      text_mode="bert")
        np.testing.assert_array_equal(np.asarray(inputs["text_ids"]), ref.text_m[order])
        np.testing.assert_allclose(np.asarray(inputs["audio"]), ref.audio_m[order])
        np.testing.assert_allclose(np.asarray(inputs["vision"]), ref.vision_m[order])
        np.testing.assert_array_equal(np.asarray(keep["text"]), ref.text_keep[order] > 0)


def tiny_model(model="ease", **changes) -> ModelConfig:
    return replace(tiny_data_and_model(model)[1], **changes)


def test_released_masks_need_the_split_and_leave_the_global_generators_alone():
    with pytest.raises(ValueError, match="train_split"):
        T.create_state(tiny_model(), TrainConfig(train_masks="released"), 0, 3)
    np.random.seed(5)
    random.seed(5)
    before = (np.random.uniform(), random.random())
    np.random.seed(5)
    random.seed(5)
    released_train_masks(odd_split(), 1111)
    assert (np.random.uniform(), random.random()) == before
    assert T.create_state(tiny_model(), TrainConfig(), 0, 3).fixed_masks is None


class Recorder:
    """The model as the train step builds it, recording the `missing_rate` it is fed."""

    def __init__(self, model, seen: list):
        self.model, self.seen = model, seen

    def apply(self, variables, inputs, *args, **kwargs):
        jax.debug.callback(lambda r: self.seen.append(np.asarray(r)), inputs["missing_rate"])
        return self.model.apply(variables, inputs, *args, **kwargs)


# Both models and both mask modes, in two compiles (each case compiles the step twice).
@pytest.mark.parametrize("model, masks", [("ease", "released"), ("lnln", "redrawn")])
def test_drawn_rate_mode_feeds_the_drawn_rates_inside_the_real_step(monkeypatch, model, masks):
    data, mcfg = tiny_data_and_model(model, n_train=12)
    seen: list = []
    real_build = T.build_model
    monkeypatch.setattr(T, "build_model", lambda cfg: Recorder(real_build(cfg), seen))
    tcfg = TrainConfig(train_masks=masks, batch_size=6)
    arrays = data.train.model_arrays("features")
    state = T.create_state(mcfg, tcfg, 1111, 2, train_split=arrays)
    rows = np.array([3, 11, 0, 7, 5, 9])
    batch = {k: np.asarray(v)[rows] for k, v in arrays.items()} | {
        "index": rows, "weight": np.ones(6, np.float32)}
    if masks == "released":
        expected = released_train_masks(arrays, 1111)["rate"][rows]
    else:
        rates = train_missing_rates(T.epoch_mask_key(state.mask_rng, 0), 12)
        expected = np.stack([np.asarray(rates[m]) for m in MODALITIES], 1)[rows]
    for rate_input in ("drawn", "observed"):
        seen.clear()
        step = jax.jit(T.make_train_step(replace(mcfg, rate_input=rate_input), T.LossConfig(),
                                         tcfg, 2, 12, axis_name=None))
        _, metrics = step(state, batch, state.rng)
        jax.effects_barrier()
        assert np.isfinite(float(metrics["total"]))
        assert len(seen) == 1
        if rate_input == "drawn":
            np.testing.assert_array_equal(seen[0], expected.astype(np.float32))
        else:  # the observed dropped fraction of the applied masks: another number
            observed = T.train_inputs(state, batch, n_train=12, steps_per_epoch=2,
                                      text_mode="features")[0]["missing_rate"]
            np.testing.assert_allclose(seen[0], np.asarray(observed), rtol=1e-6)
            assert not np.allclose(seen[0], expected)


def test_evaluation_reads_the_conditions_nominal_rate_in_drawn_mode():
    data, mcfg = tiny_data_and_model("ease")
    params = T.create_state(mcfg, TrainConfig(), 0, 3).params
    bank = MaskBank(data.test)
    batch = data.test.model_arrays("features", labels=False)
    n = data.test.n
    for condition, nominal in ((("rate", 0.3), [0.3] * 3), (("subset", "la"), [0, 0, 1.0]),
                               (("subset", "v"), [1.0, 1.0, 0]), (None, [0, 0, 0])):
        keep = bank.keep(condition)
        np.testing.assert_array_equal(keep["nominal_rate"],
                                      np.tile(np.float32(nominal), (n, 1)))
        drawn = T.forward(replace(mcfg, rate_input="drawn"), params, batch, keep)
        np.testing.assert_array_equal(np.asarray(drawn["missing_rate"]), keep["nominal_rate"])
        observed = T.forward(mcfg, params, batch, keep)
        np.testing.assert_allclose(
            np.asarray(observed["missing_rate"]),
            np.asarray(apply_keep_masks(batch, keep, text_mode="features")["missing_rate"]))
    with pytest.raises(KeyError, match="nominal_rate"):
        T.forward(replace(mcfg, rate_input="drawn"), params, batch,
                  {k: v for k, v in keep.items() if k != "nominal_rate"})


def test_switches_are_validated_and_named():
    with pytest.raises(ValueError, match="rate_input"):
        ModelConfig(rate_input="label")
    with pytest.raises(ValueError, match="train_masks"):
        TrainConfig(train_masks="fixed")
    assert behaviour(ModelConfig(), TrainConfig()) == {
        "train_masks": "redrawn", "rate_input": "observed", "eval_z": "mean", "name": "default"}
    released = behaviour(ModelConfig(rate_input="drawn", sample_at_eval=True),
                         TrainConfig(train_masks="released"))
    assert released["name"] == "released" and released["eval_z"] == "sampled"
    assert behaviour(ModelConfig(rate_input="drawn"), TrainConfig())["name"] == "mixed"


@pytest.mark.parametrize("argv, expected", [
    ([], ("redrawn", "observed", False)),
    (["--behaviour", "released"], ("released", "drawn", True)),
    (["--behaviour", "released", "--eval-z", "mean"], ("released", "drawn", False)),
    (["--train-masks", "released"], ("released", "observed", False)),
    (["--rate-input", "drawn"], ("redrawn", "drawn", False)),
])
def test_command_line_switches_reach_the_configs(argv, expected):
    from experiments import cli, sweep

    data, _ = tiny_data_and_model("lnln")
    args = sweep.parse_args("mosi", ["--text-encoder", "features", *argv])
    mcfg, _, tcfg = cli.build_run(args, "mosi", data, False, "lnln")
    assert (tcfg.train_masks, mcfg.rate_input, mcfg.sample_at_eval) == expected
