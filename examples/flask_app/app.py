"""A small Flask app served by wsgid: `--app-path examples/flask_app --wsgi-app app:app`."""
import hashlib

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from Flask, served by wsgid!\n"


@app.get("/greet/<name>")
def greet(name):
    return jsonify(greeting=f"Hello, {name}!", script_root=request.script_root, args=request.args)


@app.post("/form")
def form():
    return jsonify(form=request.form.to_dict(flat=False))


@app.post("/upload")
def upload():
    """Hashes each uploaded file as the multipart parser streams it."""
    files = {}
    for name, storage in request.files.items():
        digest, size = hashlib.sha256(), 0
        while block := storage.stream.read(65536):
            digest.update(block)
            size += len(block)
        files[name] = {"filename": storage.filename, "sha256": digest.hexdigest(), "size": size}
    return jsonify(files=files, form=request.form.to_dict())


@app.post("/body")
def body():
    """The request body's size and hash, as Flask read it (chunked uploads included)."""
    data = request.get_data()
    return jsonify(size=len(data), sha256=hashlib.sha256(data).hexdigest())
