from accel_hydra.redaction import REDACTED, redact


def test_credentials_are_replaced_at_any_depth():
    config = {
        "trainer": {
            "checkpoint_dir": "s3://bucket/run",
            "storage_options": {
                "key": "AKIA123",
                "secret": "shh",
                "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
                "connection_string": "DefaultEndpointsProtocol=http;AccountKey=abc",
                "token": None,
            },
        },
        "optimizer": {"lr": 0.1},
        "list": [{"api_key": "k"}],
    }
    clean = redact(config)
    options = clean["trainer"]["storage_options"]
    assert options["key"] == options["secret"] == options["connection_string"] == REDACTED
    assert options["token"] is None
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000"}
    assert clean["list"] == [{"api_key": REDACTED}]
    assert clean["optimizer"] == {"lr": 0.1}
    assert config["trainer"]["storage_options"]["secret"] == "shh"  # the input is untouched


def test_environment_references_are_kept():
    options = {"secret": "${oc.env:AWS_SECRET_ACCESS_KEY}", "key": "plain"}
    assert redact(options) == {"secret": "${oc.env:AWS_SECRET_ACCESS_KEY}", "key": REDACTED}


def test_ordinary_keys_are_kept():
    assert redact({"keep_last": 3, "monkey": "x", "tokens_per_batch": 5}) == {
        "keep_last": 3,
        "monkey": "x",
        "tokens_per_batch": 5,
    }
