package main

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/goccy/go-yaml"
	"github.com/spf13/cobra"

	"github.com/cutover/cutover/internal/config"
)

func newConfigCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "Work with configuration files",
	}
	var asJSON bool
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a config file and print it normalized, secrets redacted",
		Long: `Validate a config file: unknown keys, wrong types, impossible values and
malformed DSNs are reported, every one of them, with the key and the line.
On success the normalized config (defaults filled in) is printed with every
secret redacted.

Exit status: 0 valid, 1 invalid, 2 unreadable.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			loaded, err := loadConfig(g, args[0])
			if err != nil {
				return err
			}
			var out []byte
			if asJSON {
				out, err = json.MarshalIndent(loaded.Config, "", "  ")
			} else {
				out, err = yaml.MarshalWithOptions(loaded.Config, yaml.UseLiteralStyleIfMultiline(true))
			}
			if err != nil {
				return withCode(exitError, fmt.Errorf("render config: %w", err))
			}
			if len(out) > 0 && out[len(out)-1] != '\n' {
				out = append(out, '\n')
			}
			if _, err := cmd.OutOrStdout().Write(out); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "%s: valid\n", args[0])
			return nil
		},
	}
	check.Flags().BoolVar(&asJSON, "json", false, "print the normalized config as JSON instead of YAML")
	cmd.AddCommand(check)
	return cmd
}

// loadConfig loads and validates a config file, teaching the redactor its
// secrets, and maps failures to exit codes: 1 invalid, 2 unreadable.
func loadConfig(g *globals, path string) (*config.Loaded, error) {
	loaded, err := config.Load(path, nil)
	var readErr *config.ReadError
	var invalid *config.InvalidError
	switch {
	case errors.As(err, &readErr):
		return nil, withCode(exitError, err)
	case errors.As(err, &invalid):
		return nil, withCode(exitFailed, err)
	case err != nil:
		return nil, withCode(exitError, err)
	}
	g.redactor.Add(loaded.Secrets...)
	return loaded, nil
}
