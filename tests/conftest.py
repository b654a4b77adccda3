import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's standalone server) on loopback, with one bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    # Dummy credentials for the local server only; s3fs reads them from the environment.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="src-test")
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """The tiny VLM and judge at the smallest sizes, built once per test session."""
    from src_assets.tiny_models import TinySpec, build_tiny_llama_judge, build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny")
    spec = TinySpec(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=32, vision_layers=1)
    return build_tiny_vlm(root / "vlm", spec), build_tiny_llama_judge(root / "judge", spec)


@pytest.fixture(scope="session")
def trained_tiny_vlm(tiny_dirs, tmp_path_factory):
    """The smallest VLM after a short rationale SFT: it writes template-shaped responses that end, if not good ones."""
    from src_assets.rationale_sft import build_rationale_sft_set, train_rationale_sft
    from src_assets.source_data import synthetic_source
    from src_assets.training import TrainSettings

    out = tmp_path_factory.mktemp("sft")
    sft = build_rationale_sft_set(synthetic_source(seed=0, n_sft=256, n_calibrate=0, n_eval=0))
    train_rationale_sft(str(tiny_dirs[0]), sft, str(out), TrainSettings(epochs=4, learning_rate=5e-3, batch_size=16))
    return out
