"""Generated gRPC contracts of package ``cms.v1`` (see ``protos/cms/v1``).

The ``*_pb2*.py`` modules here are produced by ``python -m cms.protogen`` and
are never edited by hand or committed.
"""
