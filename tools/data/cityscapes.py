"""The Cityscapes site's downloads with the user's credentials, given without a prompt.

The same exchanges as cityscapesscripts 2.2.4 (download/downloader.py), whose own downloader
prompts for the password and hard-codes its host: ``GET <site>/login``, ``POST <site>/login``
with username, password and submit=Login (a 302 means accepted), ``<site>/downloads/?list`` (the
packages: name -> packageID), ``<site>/md5-sum/?packageID=N`` (the published md5) and
``<site>/file-handling/?packageID=N`` (the file, Range requests honoured). The site is a
parameter so that tests serve it on 127.0.0.1.
"""
import json

import requests

from convert.errors import UserError
from convert.fetch import Remote


def read_credentials(path):
    """{"username": ..., "password": ...} from a JSON file (cityscapesscripts' own
    credentials.json has this shape)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return {"username": str(data["username"]), "password": str(data["password"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read Cityscapes credentials from {path} ({e}): a JSON file "
                        '{"username": "...", "password": "..."} is expected') from None


def login(site, credentials, timeout=60):
    """A logged-in requests.Session, or a UserError (refused, no network)."""
    session = requests.Session()
    try:
        session.get(f"{site}/login", allow_redirects=False, timeout=timeout).raise_for_status()
        r = session.post(f"{site}/login", data=dict(credentials, submit="Login"),
                         allow_redirects=False, timeout=timeout)
    except requests.exceptions.RequestException as e:
        raise UserError(f"cannot reach the Cityscapes site {site} ({type(e).__name__}); "
                        "download the zips elsewhere and give their folder as MIRROR=") from None
    if r.status_code != 302:
        raise UserError(f"the Cityscapes site refused the credentials of user "
                        f"'{credentials['username']}' (HTTP {r.status_code}): check them "
                        "(https://www.cityscapes-dataset.com/login)")
    return session


def remotes(site, session, filenames, checksum_source, timeout=60):
    """{filename: Remote(url of its package, published md5)} for the packages named."""
    try:
        r = session.get(f"{site}/downloads/?list", allow_redirects=False, timeout=timeout)
        r.raise_for_status()
        ids = {p["name"]: p["packageID"] for p in r.json()}
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the Cityscapes site {site} did not list its packages ({e})") from None
    out = {}
    for name in filenames:
        if name not in ids:
            raise UserError(f"the Cityscapes site offers no package {name} to this account")
        try:
            r = session.get(f"{site}/md5-sum/?packageID={ids[name]}", allow_redirects=False,
                            timeout=timeout)
            r.raise_for_status()
            md5 = r.text.split()[0]
        except (requests.exceptions.RequestException, IndexError) as e:
            raise UserError(f"no md5 for {name} from the Cityscapes site ({e})") from None
        out[name] = Remote(name, (f"{site}/file-handling/?packageID={ids[name]}",), md5=md5,
                           checksum_source=checksum_source)
    return out
