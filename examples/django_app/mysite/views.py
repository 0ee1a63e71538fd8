import hashlib

from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt


def index(request):
    return HttpResponse("Hello from Django, served by wsgid!\n", content_type="text/plain")


def info(request):
    return JsonResponse({
        "path": request.path,
        "path_info": request.path_info,
        "script_name": request.META.get("SCRIPT_NAME"),
        "method": request.method,
        "query": request.GET.dict(),
        "extra_setting": getattr(settings, "WSGID_EXTRA", None),
    })


def upload(request):
    files = {}
    for name, uploaded in request.FILES.items():
        digest = hashlib.sha256()
        for chunk in uploaded.chunks(65536):
            digest.update(chunk)
        files[name] = {"name": uploaded.name, "size": uploaded.size, "sha256": digest.hexdigest()}
    return JsonResponse({"files": files, "fields": request.POST.dict()})


@csrf_exempt
def body(request):
    """The request body's size and hash, as Django read it (chunked uploads included)."""
    data = request.body
    return JsonResponse({"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})


def stream(request):
    """A streamed response of many small chunks."""
    count = int(request.GET.get("n", 200))
    return StreamingHttpResponse((f"{i % 10}".encode() * 10 for i in range(count)),
                                 content_type="text/plain")
