"""The committed generated code matches protos/ (regenerate with `make proto`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True, capture_output=True)
    generated = sorted(p.name for p in tmp_path.glob("*.py"))
    committed = sorted(p.name for p in (ROOT / "serving" / "_proto").glob("*_pb2*.py"))
    assert generated == committed and "grpc_service_pb2.py" in generated
    for name in generated:
        committed = (ROOT / "serving" / "_proto" / name).read_text()
        assert committed == (tmp_path / name).read_text(), f"serving/_proto/{name} is stale: run `make proto`"


def test_server_messages_coexist_with_tritonclient():
    from tritonclient.grpc import service_pb2

    from serving._proto import pb

    request = pb.ModelInferRequest(model_name="m", id="7", raw_input_contents=[b"\x00" * 4])
    request.parameters["task_id"].int64_param = 3
    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert (theirs.model_name, theirs.id, theirs.parameters["task_id"].int64_param) == ("m", "7", 3)
