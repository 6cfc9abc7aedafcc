"""Lists a tar(.gz) archive's members as JSON, the way Python's tarfile reads them.

Usage: tar-members.py <archive> <mode>, mode one of r:gz, r|gz, r:, r|. The streaming modes
(r|gz) read the first gzip member only, front to back, as many tools do. Each member: its header
fields, its PAX records, and for regular files the sha256 of its data.
"""
import hashlib
import json
import sys
import tarfile

TYPES = {tarfile.REGTYPE: 'file', tarfile.AREGTYPE: 'file', tarfile.CONTTYPE: 'contiguous-file',
         tarfile.DIRTYPE: 'directory', tarfile.SYMTYPE: 'symlink', tarfile.LNKTYPE: 'link'}

out = []
with tarfile.open(sys.argv[1], sys.argv[2]) as tar:
    for m in tar:
        item = {
            'name': m.name, 'type': TYPES.get(m.type, repr(m.type)), 'mode': m.mode, 'uid': m.uid,
            'gid': m.gid, 'uname': m.uname, 'gname': m.gname, 'mtime': m.mtime, 'size': m.size,
            'linkname': m.linkname,
            'pax': {k: v for k, v in m.pax_headers.items() if k not in ('path', 'linkpath', 'size')},
        }
        if m.isreg():
            h = hashlib.sha256()
            f = tar.extractfile(m)
            for block in iter(lambda: f.read(65536), b''):
                h.update(block)
            item['sha256'] = h.hexdigest()
        out.append(item)
json.dump(out, sys.stdout, ensure_ascii=False)
