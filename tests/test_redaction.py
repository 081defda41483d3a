from accel_hydra.redaction import REDACTED, redact

AZURE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=abc/def==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)


def test_secret_keys_are_hidden_at_any_depth_and_input_is_untouched():
    options = {
        "key": "AKIA123",
        "secret": "shh",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://s3", "aws_session_token": "tok"},
        "credentials": {"private_key": "-----BEGIN"},
        "account_key": "k",
        "sas_token": "sv=2024&sig=x",
    }
    hidden = redact({"trainer": {"storage_options": options}})["trainer"]["storage_options"]
    assert hidden == {
        "key": REDACTED,
        "secret": REDACTED,
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://s3", "aws_session_token": REDACTED},
        "credentials": REDACTED,
        "account_key": REDACTED,
        "sas_token": REDACTED,
    }
    assert options["key"] == "AKIA123"


def test_connection_string_keeps_endpoint_and_loses_account_key():
    hidden = redact({"connection_string": AZURE, "note": AZURE})
    assert hidden["connection_string"] == REDACTED
    assert "abc/def" not in hidden["note"]
    assert "AccountKey=***;" in hidden["note"]
    assert "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1" in hidden["note"]


def test_secrets_inside_urls_and_lists_are_hidden():
    hidden = redact(["https://acct.blob.core.windows.net/c?sv=1&sig=abc%2F", "s3://u:pw@host/b"])
    assert hidden == ["https://acct.blob.core.windows.net/c?sv=1&sig=***", "s3://u:***@host/b"]


def test_plain_values_pass_through():
    assert redact({"lr": 0.1, "epochs": 3, "token": None}) == {
        "lr": 0.1,
        "epochs": 3,
        "token": None,
    }
