// Serves static/ and forwards /api/* to the Python API, with Node's standard library only.
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");

const port = Number(process.env.WEB_PORT || 3000);
const apiPort = Number(process.env.API_PORT || 8000);
const staticDir = path.join(__dirname, "static");

const server = http.createServer((req, res) => {
  if (req.url.startsWith("/api/")) {
    const upstream = http.request(
      { host: "127.0.0.1", port: apiPort, path: req.url, method: req.method, headers: req.headers },
      (reply) => {
        res.writeHead(reply.statusCode, reply.headers);
        reply.pipe(res);
      },
    );
    upstream.on("error", () => {
      res.writeHead(502, { "Content-Type": "text/plain" });
      res.end("api unavailable\n");
    });
    req.pipe(upstream);
    return;
  }
  const file = path.join(staticDir, req.url === "/" ? "index.html" : path.normalize(req.url));
  if (!file.startsWith(staticDir)) {
    res.writeHead(403).end();
    return;
  }
  fs.readFile(file, (err, data) => {
    if (err) {
      res.writeHead(404, { "Content-Type": "text/plain" }).end("not found\n");
      return;
    }
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" }).end(data);
  });
});

server.listen(port, "127.0.0.1", () => {
  console.log(`web listening on http://127.0.0.1:${port}`);
});
