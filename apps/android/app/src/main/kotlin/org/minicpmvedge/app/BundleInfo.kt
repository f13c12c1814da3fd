package org.minicpmvedge.app

import org.minicpmvedge.core.BundleManifest
import org.minicpmvedge.core.Json
import org.minicpmvedge.core.PromptBuilder
import org.minicpmvedge.core.SpecialTokens
import org.minicpmvedge.core.obj
import org.minicpmvedge.core.opt
import org.minicpmvedge.core.str
import java.io.File

/**
 * An ExecuTorch bundle on the phone (docs/bundle.md): the directory holding `manifest.json`. The
 * stock runner needs the program (the manifest's `executorch.pte`, model.pte by default) and
 * tokenizer.json; the app itself needs what the core reads from the manifest (slicing settings,
 * chat template, special tokens) and the identity fields of the device report. The manifest's own
 * checksum is checked (BundleManifest.parse); the big files are not re-hashed on the phone.
 */
class BundleInfo(
    val dir: File,
    val manifest: BundleManifest,
) {
    val name: String get() = dir.name
    val pteFile: File =
        File(
            dir,
            manifest.raw
                .opt("executorch")
                ?.obj("executorch")
                ?.opt("pte")
                ?.str("executorch.pte") ?: "model.pte",
        )
    val tokenizerFile: File = File(dir, "tokenizer.json")

    init {
        if (manifest.format != "executorch") {
            throw IllegalArgumentException("bundle $name has format '${manifest.format}'; this app runs 'executorch' bundles")
        }
        for (f in listOf(pteFile, tokenizerFile)) {
            if (!f.isFile) throw IllegalArgumentException("bundle $name: ${f.name} is missing")
        }
    }

    /** The prompt layout builder: the bundle's chat template and tokenizer_config.json special tokens. */
    fun promptBuilder(): PromptBuilder {
        val template = File(dir, manifest.chatTemplateFile).readText(Charsets.UTF_8)
        val tokenizerConfig = Json.parse(File(dir, "tokenizer_config.json").readBytes())
        return PromptBuilder.fromTemplate(
            template,
            SpecialTokens.fromTokenizerConfig(tokenizerConfig),
            useImageId = manifest.sliceConfig.useImageId,
        )
    }

    companion object {
        const val MANIFEST = "manifest.json"

        /**
         * Where the app looks, in order: `<external files>/bundles/<name>/` (what `adb push` reaches
         * without root; see README), `<internal files>/bundles/<name>/`, and
         * `/data/local/tmp/minicpmv-edge/bundles/<name>/`. In each, bundle directories are tried in
         * name order; the first whose manifest.json is a valid ExecuTorch bundle wins.
         */
        fun searchRoots(
            externalFiles: File?,
            internalFiles: File,
        ): List<File> =
            listOfNotNull(
                externalFiles?.let { File(it, "bundles") },
                File(internalFiles, "bundles"),
                File("/data/local/tmp/minicpmv-edge/bundles"),
            )

        /** The first usable bundle under [roots], or null; [problems] collects why others were skipped. */
        fun find(
            roots: List<File>,
            problems: MutableList<String>,
        ): BundleInfo? {
            for (root in roots) {
                val dirs = root.listFiles()?.filter { File(it, MANIFEST).isFile }?.sortedBy { it.name } ?: continue
                for (dir in dirs) {
                    try {
                        return BundleInfo(dir, BundleManifest.parse(File(dir, MANIFEST).readBytes()))
                    } catch (e: Exception) {
                        problems.add("${dir.path}: ${e.message}")
                    }
                }
            }
            return null
        }
    }
}
