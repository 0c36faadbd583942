"""OHIF, the web viewer radiologists open the node's results in, served the way a site serves it.

Orthanc serves everything: the studies over DICOMweb (its DICOMweb plugin) and OHIF's
prebuilt app (``tests/viewer/node_modules/@ohif/app/dist``, pinned by
``tests/viewer/package-lock.json``) and its configuration (its ServeFolders plugin). A
small proxy in front puts both on one origin with OHIF at the root, as OHIF's build
expects (its chunks load from ``/``), and answers deep links such as
``/viewer?StudyInstanceUIDs=...`` with OHIF's ``index.html``, which Orthanc's
ServeFolders cannot do (a web server in front of a single-page app does exactly this).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from node_support import free_port

VIEWER = Path(__file__).resolve().parent / "viewer"
OHIF_DIST = VIEWER / "node_modules" / "@ohif" / "app" / "dist"

#: OHIF's configuration: one DICOMweb data source, Orthanc's, on the page's own origin.
APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  showErrorDetails: 'always',
  investigationalUseDialog: { option: 'never' },
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc',
        name: 'orthanc',
        wadoUriRoot: '/wado',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
"""


def orthanc_settings(folder: Path) -> dict:
    """Orthanc's configuration for serving OHIF: DICOMweb, and OHIF's files and configuration."""
    config = folder / "ohif-config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "app-config.js").write_text(APP_CONFIG)
    return {
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "WadoRoot": "/wado",
        },
        "ServeFolders": {
            "AllowCache": True,
            "Folders": {"/ohif": str(OHIF_DIST), "/ohif-config": str(config)},
        },
    }


class ViewerOrigin:
    """One origin on loopback for the browser, in front of Orthanc (see the module's docstring)."""

    PASS = ("/dicom-web/", "/wado")

    def __init__(self, orthanc_port: int) -> None:
        self.orthanc_port, self.port = orthanc_port, free_port()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                origin._forward(self)

            def log_message(self, *_args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ViewerOrigin:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _target(self, path: str) -> str:
        if path.startswith(self.PASS):
            return path
        if path.split("?")[0] == "/app-config.js":
            return "/ohif-config/app-config.js"
        return "/ohif" + ("/index.html" if path.split("?")[0] == "/" else path)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {
            k: v
            for k, v in handler.headers.items()
            if k.lower() not in ("host", "connection", "keep-alive")
        }
        status, reply, body = self._fetch(handler.command, self._target(handler.path), headers)
        page = handler.path.split("?")[0].rsplit("/", 1)[-1]
        if status == 404 and not handler.path.startswith(self.PASS) and "." not in page:
            # a deep link into the app
            status, reply, body = self._fetch(handler.command, "/ohif/index.html", headers)
        handler.send_response(status)
        for key, value in reply:
            if key.lower() not in (
                "connection",
                "keep-alive",
                "transfer-encoding",
                "content-length",
            ):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _fetch(
        self, method: str, path: str, headers: dict
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=120)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()
