#!/usr/bin/env bash
# System libraries the Python packages need but cannot install themselves:
#   Pango (WeasyPrint text layout), HarfBuzz-subset (WeasyPrint font subsetting in C; without it the
#   pure-Python fallback makes each PDF ~4 s slower), poppler-utils (pdftoppm/pdftotext: tests render
#   reports to PNG), chromium + chromium-driver (the review page's browser test drives the system's
#   Chromium with Selenium; no browser is ever downloaded), PostgreSQL (the tests run every database test
#   on SQLite and on a throw-away PostgreSQL server, scripts/pg-temp.sh; the product itself needs no server
#   unless [screening] database names one), acl (setfacl: a test that reports and reason files get the mode a
#   folder's default ACL gives). Installs with apt-get when run as root; otherwise says what to install.
set -u
need=()
ldconfig -p 2>/dev/null | grep -q 'libpango-1.0.so' || need+=(libpango-1.0-0 libpangoft2-1.0-0)
ldconfig -p 2>/dev/null | grep -q 'libharfbuzz-subset.so' || need+=(libharfbuzz-subset0)
command -v pdftoppm >/dev/null 2>&1 || need+=(poppler-utils)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
command -v setfacl >/dev/null 2>&1 || need+=(acl)
command -v fc-list >/dev/null 2>&1 && [ -n "$(fc-list 2>/dev/null | head -1)" ] || need+=(fonts-dejavu-core)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "warning: missing system packages: ${need[*]} (install them with your package manager)" >&2
fi
