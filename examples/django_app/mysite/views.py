import hashlib

from django.conf import settings
from django.http import HttpResponse, JsonResponse


def index(request):
    return HttpResponse("Hello from Django behind mongrel2 and wsgid!\n", content_type="text/plain")


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
