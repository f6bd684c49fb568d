"""GET /docs: Swagger UI over /openapi.json, every asset served here from the `swagger-ui-bundle` package, so the page
works offline (FastAPI's own /docs loads them from a CDN). ReDoc is not offered: no package ships its bundle."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from swagger_ui_bundle import swagger_ui_path

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
# The only files served (no directory listing, no path from the request reaches the file system), with their types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH, response_class=HTMLResponse)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="prefix-serve API",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        # validatorUrl null: Swagger UI would otherwise fetch a badge from validator.swagger.io
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(f"{ASSETS_PATH}/{{name}}")
async def asset(name: Annotated[str, Path(max_length=64)]) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no such docs asset {name!r}; expected one of {sorted(ASSETS)}")
    return FileResponse(
        str(swagger_ui_path / name), media_type=media_type, headers={"cache-control": "public, max-age=86400"}
    )
