import requests


def test_hello(server):
    r = requests.get(server.url + "/hello")
    assert r.status_code == 200
    assert r.text == "Hello, World!"
