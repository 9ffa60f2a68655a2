// Program otelcol-betrace is the OpenTelemetry Collector that BeTrace is tested with.
//
// Written by hand in the shape the OpenTelemetry Collector Builder (ocb, cmd/builder v0.161.0)
// generates: components() returns the factory maps, main() hands them to otelcol.NewCommand.
// Every collector module in go.mod is at one release: core v0.161.0 / v1.67.0, contrib v0.161.0.
// Build it with `make otelcol` (deploy/build.sh), which caches the binary outside the clone.
package main

import (
	"os"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/confmap/provider/envprovider"
	"go.opentelemetry.io/collector/confmap/provider/fileprovider"
	"go.opentelemetry.io/collector/confmap/provider/yamlprovider"
	"go.opentelemetry.io/collector/connector"
	"go.opentelemetry.io/collector/exporter"
	"go.opentelemetry.io/collector/exporter/debugexporter"
	"go.opentelemetry.io/collector/exporter/otlpexporter"
	"go.opentelemetry.io/collector/exporter/otlphttpexporter"
	"go.opentelemetry.io/collector/extension"
	"go.opentelemetry.io/collector/otelcol"
	"go.opentelemetry.io/collector/processor"
	"go.opentelemetry.io/collector/processor/batchprocessor"
	"go.opentelemetry.io/collector/processor/memorylimiterprocessor"
	"go.opentelemetry.io/collector/receiver"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/service/telemetry/otelconftelemetry"

	"github.com/open-telemetry/opentelemetry-collector-contrib/exporter/fileexporter"
	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/bearertokenauthextension"
	"github.com/open-telemetry/opentelemetry-collector-contrib/extension/healthcheckextension"
	"github.com/open-telemetry/opentelemetry-collector-contrib/processor/tailsamplingprocessor"
)

const (
	core     = "go.opentelemetry.io/collector/"
	contrib  = "github.com/open-telemetry/opentelemetry-collector-contrib/"
	coreV    = " v0.161.0"
	stableV  = " v1.67.0"
	contribV = " v0.161.0"
)

// aliasProvider and makeModulesMap are as ocb generates them: a factory with a deprecated type
// alias (otlp_grpc's old name "otlp") is listed under both names in `otelcol components`.
type aliasProvider interface{ DeprecatedAlias() component.Type }

func makeModulesMap[T component.Factory](factories map[component.Type]T, modules map[component.Type]string) map[component.Type]string {
	for compType, factory := range factories {
		if ap, ok := any(factory).(aliasProvider); ok {
			if alias := ap.DeprecatedAlias(); alias.String() != "" {
				modules[alias] = modules[compType]
			}
		}
	}
	return modules
}

func components() (otelcol.Factories, error) {
	var err error
	factories := otelcol.Factories{Telemetry: otelconftelemetry.NewFactory()}

	// extensions: health_check (probes), bearertokenauth (an authenticated sidecar)
	factories.Extensions, err = otelcol.MakeFactoryMap[extension.Factory](
		healthcheckextension.NewFactory(),
		bearertokenauthextension.NewFactory(),
	)
	if err != nil {
		return otelcol.Factories{}, err
	}
	factories.ExtensionModules = makeModulesMap(factories.Extensions, map[component.Type]string{
		healthcheckextension.NewFactory().Type():     contrib + "extension/healthcheckextension" + contribV,
		bearertokenauthextension.NewFactory().Type(): contrib + "extension/bearertokenauthextension" + contribV,
	})

	// receivers: otlp (gRPC and HTTP)
	factories.Receivers, err = otelcol.MakeFactoryMap[receiver.Factory](
		otlpreceiver.NewFactory(),
	)
	if err != nil {
		return otelcol.Factories{}, err
	}
	factories.ReceiverModules = makeModulesMap(factories.Receivers, map[component.Type]string{
		otlpreceiver.NewFactory().Type(): core + "receiver/otlpreceiver" + coreV,
	})

	// exporters: otlp_grpc (alias otlp), otlphttp, file, debug
	factories.Exporters, err = otelcol.MakeFactoryMap[exporter.Factory](
		otlpexporter.NewFactory(),
		otlphttpexporter.NewFactory(),
		fileexporter.NewFactory(),
		debugexporter.NewFactory(),
	)
	if err != nil {
		return otelcol.Factories{}, err
	}
	factories.ExporterModules = makeModulesMap(factories.Exporters, map[component.Type]string{
		otlpexporter.NewFactory().Type():     core + "exporter/otlpexporter" + coreV,
		otlphttpexporter.NewFactory().Type(): core + "exporter/otlphttpexporter" + coreV,
		fileexporter.NewFactory().Type():     contrib + "exporter/fileexporter" + contribV,
		debugexporter.NewFactory().Type():    core + "exporter/debugexporter" + coreV,
	})

	// processors: batch, memory_limiter, tail_sampling (the side-by-side comparison)
	factories.Processors, err = otelcol.MakeFactoryMap[processor.Factory](
		batchprocessor.NewFactory(),
		memorylimiterprocessor.NewFactory(),
		tailsamplingprocessor.NewFactory(),
	)
	if err != nil {
		return otelcol.Factories{}, err
	}
	factories.ProcessorModules = makeModulesMap(factories.Processors, map[component.Type]string{
		batchprocessor.NewFactory().Type():         core + "processor/batchprocessor" + coreV,
		memorylimiterprocessor.NewFactory().Type(): core + "processor/memorylimiterprocessor" + coreV,
		tailsamplingprocessor.NewFactory().Type():  contrib + "processor/tailsamplingprocessor" + contribV,
	})

	// no connectors
	factories.Connectors, err = otelcol.MakeFactoryMap[connector.Factory]()
	if err != nil {
		return otelcol.Factories{}, err
	}
	factories.ConnectorModules = map[component.Type]string{}

	return factories, nil
}

func main() {
	set := otelcol.CollectorSettings{
		BuildInfo: component.BuildInfo{
			Command:     "otelcol-betrace",
			Description: "OpenTelemetry Collector for BeTrace's tests (core v0.161.0, contrib v0.161.0)",
			Version:     "0.161.0",
		},
		Factories: components,
		ConfigProviderSettings: otelcol.ConfigProviderSettings{
			ResolverSettings: confmap.ResolverSettings{
				// file: (the default for a bare path), env: and yaml: as in ocb's defaults;
				// http(s): left out, configs here are local files.
				ProviderFactories: []confmap.ProviderFactory{
					envprovider.NewFactory(),
					fileprovider.NewFactory(),
					yamlprovider.NewFactory(),
				},
			},
		},
		ProviderModules: map[string]string{
			envprovider.NewFactory().Create(confmap.ProviderSettings{}).Scheme():  core + "confmap/provider/envprovider" + stableV,
			fileprovider.NewFactory().Create(confmap.ProviderSettings{}).Scheme(): core + "confmap/provider/fileprovider" + stableV,
			yamlprovider.NewFactory().Create(confmap.ProviderSettings{}).Scheme(): core + "confmap/provider/yamlprovider" + stableV,
		},
	}
	// cobra logs the error itself; exit non-zero without repeating it.
	if err := otelcol.NewCommand(set).Execute(); err != nil {
		os.Exit(1)
	}
}
