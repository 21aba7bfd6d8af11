"""The server's img2img / inpainting fields (issue 15): base64 init and mask images, strength, paste_back."""
import json

import pytest

pytest.importorskip("fastapi")

from t2iadapter.pngmeta import CHUNK  # noqa: E402
from test_server import body, client, decode, one_thread, pipe, png_b64  # noqa: E402,F401  (fixtures)


def test_img2img_and_inpainting_over_json(client):
    r = client.post("/v1/generate", json=body(init_image=png_b64(64, 64, "RGB", 1), strength=0.5, steps=4))
    assert r.status_code == 200, r.text
    im = decode(r.json()["images"][0]["png"])
    assert im.size == (64, 64) and json.loads(im.text[CHUNK])["strength"] == 0.5
    r = client.post("/v1/generate", json=body(init_image=png_b64(64, 64, "RGB", 1), mask_image=png_b64(64, 64, "L", 2),
                                              paste_back=True, steps=2))
    assert r.status_code == 200, r.text
    assert json.loads(decode(r.json()["images"][0]["png"]).text[CHUNK])["inpaint"] is True


@pytest.mark.parametrize("patch, reason", [
    ({"init_image": png_b64(64, 64, "RGB"), "strength": 1.5}, "less than or equal to 1"),
    ({"strength": 0.5}, "strength needs init_image"),
    ({"init_image": png_b64(64, 64, "RGB"), "mask_image": png_b64(32, 32)}, "mask_image is 32x32"),
    ({"init_image": "not base64!"}, "not valid base64"),
])
def test_bad_img2img_requests_get_422(client, patch, reason):
    r = client.post("/v1/generate", json=body(**patch))
    assert r.status_code == 422 and reason in r.text, r.text
