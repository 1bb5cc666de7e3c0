import dataclasses

import pytest

from tune.config import ConfigError, TrialConfig, field_help


def test_every_field_has_a_docstring():
    docs = field_help()
    missing = [f.name for f in dataclasses.fields(TrialConfig) if not docs.get(f.name)]
    assert not missing


def test_defaults_are_the_study_protocol():
    c = TrialConfig()
    assert (c.lr, c.batch_size, c.epochs, c.hidden, c.val_size) == (1e-3, 100, 100, 1024, 10000)
    assert c.select_by == "val_loss" and c.patience == 0 and c.normalize == "center"
    assert TrialConfig(model="cnn").order == "bn,relu,dropout,pool"
    assert TrialConfig(model="mlp").order == "bn,relu,dropout"  # pool means nothing to the MLP


@pytest.mark.parametrize("values, field", [
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.5), "dropout"),
    (dict(order="bn,relu,bogus,pool"), "order"),
    (dict(model="cnn", order="bn,relu,dropout"), "order"),
    (dict(model="vit"), "model"),
    (dict(dropout_kind="channel"), "dropout_kind"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=-1), "batch_size"),
    (dict(lr=0), "lr"),
    (dict(epochs="three"), "epochs"),
    (dict(epochs=2.5), "epochs"),
    (dict(select_by="test_acc"), "select_by"),
    (dict(kernels="3,4", model="cnn"), "kernels"),
    (dict(warmup=3), "warmup"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(values)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_strings_are_coerced_like_cli_and_mlflow_params():
    c = TrialConfig.from_dict({"dropout": "0.25", "epochs": "3", "compile": "false", "lr": "3e-4"})
    assert (c.dropout, c.epochs, c.compile, c.lr) == (0.25, 3, False, 3e-4)
    # a config round-trips through its dict
    assert TrialConfig.from_dict(c.to_dict()) == c


def test_key_groups_seeds_of_one_configuration():
    a, b = TrialConfig(seed=1), TrialConfig(seed=2)
    assert a.key() == b.key()
    assert a.key() != TrialConfig(seed=1, dropout=0.3).key()
