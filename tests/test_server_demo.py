"""`t2iadapter serve` on the embedded demo model, built exactly as the command builds it."""
import base64
import io

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from t2iadapter.cli import build_parser  # noqa: E402
from t2iadapter.commands.serve import settings_from  # noqa: E402
from t2iadapter.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client():
    args = build_parser().parse_args(["serve", "--max-steps", "4", "--max-side", "256"])
    settings, limits = settings_from(args)
    assert settings.fuser == "demo/fuser" and "fuser" not in settings.adapters
    with TestClient(create_app(settings.load_pipeline(), limits=limits)) as c:
        yield c


def test_serve_registers_shipped_demo_controlnets(monkeypatch):
    from t2iadapter import assets

    args = build_parser().parse_args(["serve"])
    assert settings_from(args)[0].controlnets == {}  # none shipped yet: none registered
    monkeypatch.setattr(assets, "demo_controlnet_names", lambda: ["controlnet-sketch"])
    assert settings_from(args)[0].controlnets == {"controlnet-sketch": "demo/controlnet-sketch"}
    given = build_parser().parse_args(["serve", "--controlnet", "mine=./cn"])
    assert settings_from(given)[0].controlnets == {"mine": "./cn"}  # named ones replace the default set


def png(path: str) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_demo_models_and_controlled_generation(client):
    models = client.get("/v1/models").json()
    assert {a["name"] for a in models["adapters"]} == {"sketch", "seg", "depth", "pose", "color"}
    req = {"prompt": "a large blue star left of a large cyan triangle", "steps": 2, "seed": 1, "width": 128, "height": 128,
           "conditions": {"sketch": png("examples/sketch.png"), "color": png("examples/palette.png")},
           "adapters": {"sketch": {"weight": 1.0}, "color": {"weight": 0.8, "window": "0:0.5"}}, "compose": "fuser"}
    r = client.post("/v1/generate", json=req)
    assert r.status_code == 200, r.text
    out = r.json()
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][0]["png"])))
    assert image.size == (128, 128) and out["parameters"]["compose"] == "fuser"
    assert client.post("/v1/generate", json=dict(req, steps=50)).status_code == 422
    assert client.post("/v1/generate", json=dict(req, conditions={"../../etc/passwd": png("examples/sketch.png")})).status_code in (404, 422)
