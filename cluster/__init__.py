"""One YAML per cluster: the closed schema (`schema`), the capacity planner (`planner`), the expert placement map
(`placement`) and the deployable configs rendered from it (`render`). See cluster/README.md."""
