"""An HTTP/1.1 server that serves one keep-alive connection at a time, as Python's http.server
does when it is not threading: the next connection waits in the backlog until the served one
closes. For the gateway's tests and bench (docs/gateway.md, "Upstream connections").
Prints its port once it listens. GET answers `ok <path>` (after N ms for /sleep/N); POST echoes
its body."""
import http.server
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/sleep/"):
            time.sleep(int(self.path[len("/sleep/"):]) / 1000)
        self.answer(b"ok " + self.path.encode())

    def do_POST(self):
        self.answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def log_message(self, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
