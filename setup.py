"""Maps the top-level grammar/, passes/ and backends/ folders into the `surgery` package."""

from setuptools import find_packages, setup

# docs/errors holds the long explanation of every diagnostic code (`surgery explain E0500`).
MAPPED = {"grammar": "grammar", "passes": "passes", "backends": "backends",
          "errordocs": "docs/errors"}

packages = ["surgery"] + [f"surgery.{p}" for p in find_packages("surgery")]
package_dir = {"surgery": "surgery"}
for name, folder in MAPPED.items():
    packages.append(f"surgery.{name}")
    package_dir[f"surgery.{name}"] = folder
    packages += [f"surgery.{name}.{p}" for p in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
