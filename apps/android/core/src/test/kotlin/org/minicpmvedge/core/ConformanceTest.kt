package org.minicpmvedge.core

import org.junit.jupiter.api.DynamicTest
import org.junit.jupiter.api.Test
import org.junit.jupiter.api.TestFactory
import java.io.File
import javax.imageio.ImageIO
import kotlin.test.assertContentEquals
import kotlin.test.assertEquals
import kotlin.test.assertTrue
import kotlin.test.fail

/**
 * The core against a conformance kit (env CONFORMANCE_KIT): every image case and every
 * generation's image (plan, resized views, patches, position ids), the EXIF case, every prompt
 * case and every generation's prompt.
 */
class ConformanceTest {
    private val kit = Kit.fromEnv()

    private fun sizeOrNull(v: JsonValue?): Size2? = v?.takeUnless { it.isNull }?.ints()?.let { Size2(it[0], it[1]) }

    private fun checkPlan(
        plan: SlicePlan,
        want: JsonObject,
    ) {
        assertEquals(want.req("image_size").ints().toList(), plan.imageSize.toList(), "image_size")
        assertEquals(want.req("source_size").ints().toList(), plan.sourceSize.toList(), "source_size")
        assertEquals(sizeOrNull(want["grid"]), plan.grid, "grid")
        assertEquals(sizeOrNull(want["refine_size"]), plan.refineSize, "refine_size")
        assertEquals(sizeOrNull(want["tile_size"]), plan.tileSize, "tile_size")
        assertEquals(want.req("n_slices").int(), plan.nSlices, "n_slices")
        assertEquals(
            want
                .req("slice_sizes")
                .arr()
                .items
                .map { it.ints().toList() },
            plan.sliceSizes.map { it.toList() },
            "slice_sizes",
        )
        assertEquals(
            want
                .req("patch_grids")
                .arr()
                .items
                .map { it.ints().toList() },
            plan.patchGrids.map { it.toList() },
            "patch_grids",
        )
        assertEquals(want.req("token_counts").ints().toList(), plan.tokenCounts, "token_counts")
        assertEquals(want.req("num_tokens").int(), plan.numTokens, "num_tokens")
    }

    private fun assertPixels(
        want: Kit.ArrayRef,
        got: ImagePixels,
        what: String,
    ) {
        assertEquals(listOf(got.height, got.width, 3), want.shape.toList(), "$what shape")
        val w = want.u8()
        for (i in w.indices) {
            if (w[i] != got.rgb[i]) {
                val px = i / 3
                fail(
                    "$what differs at (y ${px / got.width}, x ${px % got.width}, c ${i % 3}): " +
                        "got ${got.rgb[i].toInt() and 0xff}, want ${w[i].toInt() and 0xff}",
                )
            }
        }
    }

    /** Everything an image case (or a generation's image) states, from its pixels. */
    private fun checkImageCase(
        case: JsonObject,
        name: String,
    ) {
        val cfg = kit.sliceConfig(case)
        val img = kit.pixels(case)
        val prepared = Slicing.preprocessImage(img, cfg)
        checkPlan(prepared.plan, case.req("plan").obj())
        val resized = case.req("resized").obj()
        assertPixels(kit.ref(resized.req("source")), prepared.source, "$name resized source")
        val refineRef = resized.opt("refine")
        if (refineRef == null) {
            assertEquals(null, prepared.refine, "$name: refine must be null")
        } else {
            assertPixels(kit.ref(refineRef), prepared.refine ?: fail("$name: no refine image"), "$name resized refine")
        }
        val slices =
            case
                .req("slices")
                .arr()
                .items
                .map { it.obj() }
        assertEquals(slices.size, prepared.slices.size, "$name slice count")
        for ((i, s) in slices.withIndex()) {
            val got = prepared.slices[i]
            assertEquals(s.req("index").int(), got.index, "$name slice $i index")
            assertEquals(s.req("patch_grid").ints().toList(), listOf(got.patchRows, got.patchCols), "$name slice $i patch_grid")
            assertEquals(s.req("tokens").int(), got.tokens, "$name slice $i tokens")
            assertEquals(listOf(got.patchRows * cfg.patchSize, got.patchCols * cfg.patchSize), listOf(got.pixels.height, got.pixels.width))
            val patches = got.patches ?: fail("$name slice $i: no patches")
            val pRef = kit.ref(s.req("patches"))
            assertEquals(
                listOf(got.patchRows * got.patchCols, 3 * cfg.patchSize * cfg.patchSize),
                pRef.shape.toList(),
                "$name slice $i patches shape",
            )
            val want = pRef.f32()
            assertEquals(want.size, patches.patches.size, "$name slice $i patch values")
            for (k in want.indices) {
                val d = Math.abs(want[k].toDouble() - patches.patches[k].toDouble())
                if (!(d <= pRef.atol)) fail("$name slice $i patch value $k: got ${patches.patches[k]}, want ${want[k]} (atol ${pRef.atol})")
            }
            val posRef = kit.ref(s.req("position_ids"))
            assertContentEquals(posRef.i64(), patches.positionIds, "$name slice $i position_ids")
        }
        // each slice's pixels are the kit-checked source view, or their tile cut from the kit-checked refined image
        for (s in prepared.slices) {
            val expect =
                if (s.index == 0) {
                    prepared.source
                } else {
                    val grid = prepared.plan.grid!!
                    val tile = prepared.plan.tileSize!!
                    val r = (s.index - 1) / grid.w
                    val c = (s.index - 1) % grid.w
                    prepared.refine!!.crop(c * tile.w, r * tile.h, tile.w, tile.h)
                }
            assertContentEquals(expect.rgb, s.pixels.rgb, "$name slice ${s.index} pixels")
        }
        // the pixels-only path (an image-taking vision method) gives the same slice pixels
        val pixelsOnly = Slicing.preprocessImage(img, cfg, withPatches = false)
        for ((i, s) in pixelsOnly.slices.withIndex()) {
            assertEquals(null, s.patches)
            assertContentEquals(prepared.slices[i].pixels.rgb, s.pixels.rgb, "$name slice $i pixels (no patches)")
        }
    }

    @TestFactory
    fun imageCases(): List<DynamicTest> {
        val cases = kit.list("images")
        assertTrue(cases.isNotEmpty(), "the kit has no image cases")
        return cases.map { c -> DynamicTest.dynamicTest("image ${c.req("name").str()}") { checkImageCase(c, c.req("name").str()) } }
    }

    @TestFactory
    fun generationImages(): List<DynamicTest> {
        val gens = kit.list("generations")
        assertTrue(gens.isNotEmpty(), "the kit has no generations")
        return gens.mapNotNull { g ->
            val image = g.opt("image")?.obj() ?: return@mapNotNull null
            val name = "generation ${g.req("name").str()} image"
            DynamicTest.dynamicTest(name) { checkImageCase(image, name) }
        }
    }

    @Test
    fun exifCase() {
        val case = kit.list("images").firstOrNull { it.has("encoded_file") } ?: fail("the kit has no EXIF case (encoded_file)")
        val bytes = File(kit.dir, case.req("encoded_file").str()).readBytes()
        val orientation = Exif.jpegOrientation(bytes)
        assertEquals(6, orientation, "orientation of ${case.req("encoded_file").str()}")
        // decode with the JVM's JPEG decoder (no EXIF handling), then apply the orientation ourselves
        val decoded = ImageIO.read(bytes.inputStream()) ?: fail("ImageIO cannot decode the kit's JPEG")
        val argb = decoded.getRGB(0, 0, decoded.width, decoded.height, null, 0, decoded.width)
        val stored = ImagePixels.fromArgb(decoded.width, decoded.height, argb)
        val upright = Exif.applyOrientation(stored, orientation)
        val want = kit.pixels(case)
        assertEquals(listOf(want.width, want.height), listOf(upright.width, upright.height), "upright size")
        assertEquals(listOf(stored.height, stored.width), listOf(upright.width, upright.height), "orientation 6 swaps the sides")
        // decoders differ by a few levels: compare loosely here (the kit's pixels are the input of the exact checks)
        var sum = 0L
        var worst = 0
        for (i in want.rgb.indices) {
            val d = Math.abs((want.rgb[i].toInt() and 0xff) - (upright.rgb[i].toInt() and 0xff))
            sum += d
            worst = maxOf(worst, d)
        }
        val mean = sum.toDouble() / want.rgb.size
        assertTrue(mean < 2.0 && worst <= 48, "decoded+rotated JPEG vs kit pixels: mean |diff| $mean, max $worst")
        // rotated the other way (orientation 8) it must be far off, so the check above can fail
        val other = Exif.applyOrientation(stored, 8)
        val otherMean =
            want.rgb.indices
                .sumOf { i -> Math.abs((want.rgb[i].toInt() and 0xff) - (other.rgb[i].toInt() and 0xff)).toLong() }
                .toDouble() /
                want.rgb.size
        assertTrue(otherMean > 4 * mean + 1, "rotating the other way should not match (mean $otherMean vs $mean)")
    }

    private fun builder(): PromptBuilder {
        val template = kit.asset("chat_template.jinja").readText()
        val tokens = SpecialTokens.fromTokenizerConfig(Json.parse(kit.asset("tokenizer_config.json").readBytes()))
        return PromptBuilder.fromTemplate(
            template,
            tokens,
            kit.sliceConfigJson
                .obj()
                .req("use_image_id")
                .bool(),
        )
    }

    /** Structure every layout must have: each slice between its opening and closing special tokens. */
    private fun checkSegments(
        layout: PromptLayout,
        images: List<ImageLayout>,
    ) {
        val t = SpecialTokens()
        val want =
            images.withIndex().flatMap { (i, im) ->
                (0 until im.sliceCount).map { k ->
                    Triple(
                        i,
                        k,
                        if (k ==
                            0
                        ) {
                            im.sourceTokens
                        } else {
                            im.tileTokens[k - 1]
                        },
                    )
                }
            }
        assertEquals(want, layout.slices.map { Triple(it.imageIndex, it.sliceIndex, it.tokens) }, "slice segments in order")
        for ((i, seg) in layout.segments.withIndex()) {
            if (seg !is PromptSegment.Slice) continue
            val before = layout.segments.getOrNull(i - 1) as? PromptSegment.Text ?: fail("slice segment $i has no text before it")
            val after = layout.segments.getOrNull(i + 1) as? PromptSegment.Text ?: fail("slice segment $i has no text after it")
            val (open, close) = if (seg.sliceIndex == 0) t.imageStart to t.imageEnd else t.sliceStart to t.sliceEnd
            assertTrue(before.text.endsWith(open) && after.text.startsWith(close), "slice segment $i is not inside $open...$close")
            assertTrue(!before.text.contains(t.imageToken) && !after.text.contains(t.imageToken), "image token inside a text segment")
        }
    }

    @TestFactory
    fun promptCases(): List<DynamicTest> {
        val cases = kit.list("prompts")
        assertTrue(cases.isNotEmpty(), "the kit has no prompt cases")
        val imageCases = kit.list("images").associateBy { it.req("name").str() }
        return cases.map { c ->
            DynamicTest.dynamicTest("prompt ${c.req("name").str()}") {
                val images =
                    c.req("images").arr().items.map { it.obj() }.map { im ->
                        val layout =
                            ImageLayout(im.req("source_tokens").int(), sizeOrNull(im["grid"]), im.req("tile_tokens").ints().toList())
                        // the layout the kit states is the one our plan of that image case gives
                        val case = imageCases[im.req("image").str()] ?: fail("no image case ${im.req("image").str()}")
                        val plan = Slicing.planSlices(kit.pixels(case).height, kit.pixels(case).width, kit.sliceConfig(case))
                        assertEquals(layout, plan.layout(), "layout of ${im.req("image").str()}")
                        layout
                    }
                val layout = builder().build(c.req("text").str(), images)
                checkSegments(layout, images)
                assertEquals(c.req("prompt_text").str(), layout.promptText())
            }
        }
    }

    @TestFactory
    fun generationPrompts(): List<DynamicTest> {
        val decoder = VocabDecoder(kit.asset("tokenizer.json"))
        val gens = kit.list("generations")
        assertTrue(gens.isNotEmpty(), "the kit has no generations")
        return gens.map { g ->
            DynamicTest.dynamicTest("generation ${g.req("name").str()} prompt") {
                val images =
                    g.opt("image")?.obj()?.let { case ->
                        listOf(Slicing.preprocessImage(kit.pixels(case), kit.sliceConfig(case), withPatches = false).layout())
                    } ?: emptyList()
                val layout = builder().build(g.req("question").str(), images)
                checkSegments(layout, images)
                val ids = g.req("prompt_ids").ints()
                assertEquals(decoder.decode(ids), layout.promptText(), "prompt text of prompt_ids")
                // the runs of image ids in prompt_ids are the slices, in order, with their token counts
                val runs = ArrayList<Int>()
                var i = 0
                while (i < ids.size) {
                    if (ids[i] == kit.imageTokenId) {
                        var j = i
                        while (j < ids.size && ids[j] == kit.imageTokenId) j++
                        runs.add(j - i)
                        i = j
                    } else {
                        i++
                    }
                }
                assertEquals(layout.slices.map { it.tokens }, runs, "image-token runs of prompt_ids")
            }
        }
    }

    @Test
    fun sliceConfigFromAssets() {
        val fromKit = SliceConfig.fromJson(kit.sliceConfigJson, kit.numPatchesPerSide)
        val fromFile = SliceConfig.fromJson(Json.parse(kit.asset("preprocessor_config.json").readBytes()), kit.numPatchesPerSide)
        assertEquals(fromKit, fromFile)
        if (kit.hasAsset("manifest.json")) {
            val m = BundleManifest.parse(kit.asset("manifest.json").readBytes())
            assertEquals(fromKit, m.sliceConfig)
        }
    }

    @Test
    fun chatTemplateRecognised() {
        val template = kit.asset("chat_template.jinja").readText()
        assertEquals(ChatFormat.minicpmV46(), ChatFormat.fromTemplate(template))
        val changed = template.replace("<think>\\n\\n</think>\\n\\n", "<think></think>")
        val err = runCatching { ChatFormat.fromTemplate(changed) }.exceptionOrNull()
        assertTrue(
            err is IllegalArgumentException && err.message!!.contains("unsupported chat template"),
            "a changed template is refused: $err",
        )
    }
}
